"""What the host makes of one record of a streamed dataset: its two views, as uint8 crops.

Step by step (``crop_steps``; ``make_crop_fn`` chains them, ``benchmarks.host_pieces`` times
them): **read** the file (a folder's records hold paths); **locate**: the image's size from its
header (nothing decoded), each view's window by torchvision's sampler seeded by ``(seed, epoch,
index, view)``, and the union of the windows; **decode** the union once (a JPEG only there:
``decode_and_crop_jpeg`` skips the IDCT outside it); **crop** each view's window out of it;
**resize** each to ``S x S``, bilinear with antialiasing, rounded to uint8. With
``dataset.resize_on = "device"`` the last two steps become **pack**: the decoded union and each
view's box inside it go to the device, which cuts and resizes there (``window_resize``: the
same views within one grey level), leaving the host about a third of the work.

A view is therefore the whole image decoded, its window cut out and resized, whatever the other
view (``tests/test_host_crops.py`` restates it so). Evaluation (``make_eval_fn``): the shorter
side resized to ``S * 256 / 224``, the centre ``S x S``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from moco_jax.data.augment import CROP_TRIES, crop_window

# Images the host will not decode, checked from the header before any decoding: below MIN_SIDE
# pixels on a side (a 1x1 tracking pixel, a broken thumbnail: nothing to crop) or above
# MAX_PIXELS (PIL's decompression-bomb limit: a 20000x20000 PNG of a few kilobytes would take
# 1.2 GB decoded, times the parallel decoders).
MIN_SIDE, MAX_PIXELS = 8, 89_478_485
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tf():
    from moco_jax.data.tfds_source import _quiet_tensorflow

    return _quiet_tensorflow()


def tf_namespace(tf) -> SimpleNamespace:
    """The array ops ``augment.crop_window`` needs, as TensorFlow ops (graph-safe, any shape)."""
    return SimpleNamespace(
        float32=tf.float32,
        int32=tf.int32,
        asarray=lambda x, dtype: tf.cast(x, dtype),
        astype=lambda x, dtype: tf.cast(x, dtype),
        maximum=tf.maximum,
        exp=tf.exp,
        sqrt=tf.sqrt,
        round=tf.round,  # half to even, as jnp.round and Python's round
        floor=tf.floor,
        where=tf.where,
        argmax=lambda x: tf.argmax(tf.cast(x, tf.int32)),
        any=tf.reduce_any,
        stack=tf.stack,
    )


def _crop_window(tf, shape, seed, scale, ratio):
    """``[top, left, h, w]`` of torchvision's RandomResizedCrop sampler (``augment.crop_window``,
    its uniforms a stateless function of ``seed``; ``shape`` may be known only at run time)."""
    uniforms = tf.random.stateless_uniform([2 * CROP_TRIES + 2], seed=seed)
    area_u, ratio_u = uniforms[:CROP_TRIES], uniforms[CROP_TRIES : 2 * CROP_TRIES]
    top_u, left_u = uniforms[2 * CROP_TRIES], uniforms[2 * CROP_TRIES + 1]
    return crop_window(
        tf_namespace(tf), shape[0], shape[1], area_u, ratio_u, top_u, left_u, scale, ratio
    )


def _png_shape(tf, encoded):
    """Height and width from a PNG's IHDR chunk (bytes 16-23, big-endian), nothing decoded."""
    size = tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8, little_endian=False)
    size = tf.reshape(tf.cast(size, tf.int64), [2, 4])
    width, height = tf.unstack(tf.reduce_sum(size * [1 << 24, 1 << 16, 1 << 8, 1], axis=1))
    return tf.cast(tf.stack([height, width]), tf.int32)


def _image_shape(tf, encoded, channels):
    """Height and width without decoding JPEGs or PNGs (other formats are decoded); an error,
    so the image is skipped, outside ``MIN_SIDE`` and ``MAX_PIXELS``."""
    is_png = tf.strings.substr(encoded, 0, len(PNG_SIGNATURE)) == PNG_SIGNATURE
    shape = tf.case(
        [
            (tf.io.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2]),
            (is_png, lambda: _png_shape(tf, encoded)),
        ],
        default=lambda: tf.shape(tf.io.decode_image(encoded, channels, expand_animations=False))[
            :2
        ],
    )
    area = tf.cast(shape[0], tf.int64) * tf.cast(shape[1], tf.int64)
    fits = tf.logical_and(tf.reduce_min(shape) >= MIN_SIDE, area <= MAX_PIXELS)
    check = tf.debugging.Assert(fits, ["image size out of bounds:", shape])
    with tf.control_dependencies([check]):
        return tf.identity(shape)


# Columns a union window is widened by on each side (one 4:2:0 MCU): ``decode_and_crop_jpeg``
# upsamples the chroma of a crop's edge column without its outside neighbour (up to ~9 levels
# off there), so the views' own edge columns must lie inside what is decoded.
UNION_MARGIN = 16


def _union(tf, shape, windows):
    """``[top, left, h, w]`` of the smallest window holding all ``windows``, widened by
    ``UNION_MARGIN`` columns each side (within the image)."""
    windows = tf.stack(windows)
    top = tf.reduce_min(windows[:, 0])
    bottom = tf.reduce_max(windows[:, 0] + windows[:, 2])
    left = tf.maximum(tf.reduce_min(windows[:, 1]) - UNION_MARGIN, 0)
    right = tf.minimum(tf.reduce_max(windows[:, 1] + windows[:, 3]) + UNION_MARGIN, shape[1])
    return tf.stack([top, left, bottom - top, right - left])


def _decode_window(tf, encoded, window, channels):
    """The pixels of ``window``: a JPEG decoded only there (rows below it and columns beside it
    are not transformed), other formats decoded whole and sliced."""

    def other():
        image = tf.io.decode_image(encoded, channels, expand_animations=False)
        return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]

    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.image.decode_and_crop_jpeg(encoded, window, channels=channels),
        other,
    )


def _resize(tf, image, size):
    """uint8 ``image`` resized to ``size x size``, bilinear with antialiasing, rounded to uint8.

    The op ``tf.image.resize(method="bilinear", antialias=True)`` runs (a triangle filter
    widened by the scale factor when shrinking: PIL's bilinear), with the same scale and no
    translation, but fed the uint8 pixels: the wrapper first casts them to a float32 copy,
    which costs as much again as the resize's own arithmetic (the results are equal)."""
    scale = size / tf.cast(tf.shape(image)[:2], tf.float32)
    resized = tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=[size, size],
        scale=scale,
        translation=tf.zeros([2]),
        kernel_type="triangle",
        antialias=True,
    )[0]
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def resizes_on_device(config: Any) -> bool:
    """Whether the views' resize is left to the device (``dataset.resize_on``)."""
    return config.dataset.get("resize_on", "host") == "device"


def crop_steps(config: Any, epoch: int, num_views: int = 2, from_files: bool = False):
    """``[(name, step)]``: the host's work on one record in order, each step taking what the
    one before returns (the first: ``(index, (encoded image or path, label))``; the last
    returns ``(*views, label)``, or with ``dataset.resize_on = "device"`` ``(union, boxes,
    label)``, see ``pack``). ``from_files``: records hold the images' paths."""
    tf = _tf()
    size, channels = config.dataset.image_size, config.dataset.num_channels
    side = config.dataset.get("union_buffer", 0)
    scale, ratio = tuple(config.augment.crop_scale), tuple(config.augment.crop_ratio)
    first_seed = tf.cast(config.seed * 1_000_003 + epoch, tf.int64)

    def read(index, example):
        encoded, label = example
        return index, tf.io.read_file(encoded) if from_files else encoded, label

    def locate(index, encoded, label):
        shape = _image_shape(tf, encoded, channels)
        windows = []
        for view in range(num_views):
            seed = tf.stack([first_seed, index + view * (1 << 40)])
            windows.append(_crop_window(tf, shape, seed, scale, ratio))
        return encoded, tf.stack(windows), _union(tf, shape, windows), label

    def decode(encoded, windows, union, label):
        return _decode_window(tf, encoded, union, channels), windows, union, label

    def crop(pixels, windows, union, label):
        crops = []
        for view in range(num_views):
            top, left, h, w = tf.unstack(windows[view] - tf.stack([union[0], union[1], 0, 0]))
            crops.append(pixels[top : top + h, left : left + w])
        return tuple(crops), label

    def resize(crops, label):
        return (*(_resize(tf, image, size) for image in crops), label)

    def pack(pixels, windows, union, label):
        """For ``window_resize`` on the device: the decoded union with each view's box inside
        it; a union larger than ``union_buffer`` on a side: the views resized here, side by
        side, each box ``S x S`` (which the device returns unchanged)."""
        shape = tf.shape(pixels)

        def decoded():
            return pixels, windows - tf.stack([union[0], union[1], 0, 0])

        def resized():
            views = resize(*crop(pixels, windows, union, label))[:-1]
            boxes = [[0, view * size, size, size] for view in range(num_views)]
            return tf.concat(views, axis=1), tf.constant(boxes, tf.int32)

        union_pixels, boxes = tf.cond(
            tf.logical_and(shape[0] <= side, shape[1] <= side), decoded, resized
        )
        return union_pixels, boxes, label

    if resizes_on_device(config):
        return [("read", read), ("locate", locate), ("decode", decode), ("pack", pack)]
    return [("read", read), ("locate", locate), ("decode", decode), ("crop", crop),
            ("resize", resize)]  # fmt: skip


def chain(steps):
    """One function running ``steps`` (``crop_steps``' pairs, or the first few) in order."""

    def run(*value):
        for _, step in steps:
            value = step(*value)
        return value

    return run


def make_crop_fn(config: Any, epoch: int, num_views: int = 2, from_files: bool = False):
    """tf.data map: ``(index, (encoded image, label)) -> (crop_q, crop_k, label)`` (or
    ``(crop, label)`` with ``num_views=1``; ``(union, boxes, label)`` when the device resizes);
    ``from_files``: records hold the images' paths."""
    return chain(crop_steps(config, epoch, num_views, from_files))


def make_eval_fn(config: Any, from_files: bool = False):
    """tf.data map for evaluation: resize the shorter side to ``S * 256 / 224``, centre-crop S."""
    tf = _tf()
    size, channels = config.dataset.image_size, config.dataset.num_channels

    def centre(encoded, label):
        if from_files:
            encoded = tf.io.read_file(encoded)
        with tf.control_dependencies([_image_shape(tf, encoded, channels)]):  # bounds first
            image = tf.io.decode_image(encoded, channels, expand_animations=False)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        resize_to = size * 256 / 224
        factor = resize_to / tf.reduce_min(shape)
        new_shape = tf.cast(tf.round(shape * factor), tf.int32)
        image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
        top = (new_shape[0] - size) // 2
        left = (new_shape[1] - size) // 2
        image = image[top : top + size, left : left + size]
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

    return centre
