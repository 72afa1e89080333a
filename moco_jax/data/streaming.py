"""Large-image datasets (ImageNet, Imagenette): the host decodes and crops, the device the rest.

Per example the host (tf.data, parallel) decodes the JPEG only inside two independent
random-resized-crop windows and resizes each to the training size as uint8. The windows follow
the rule the device crop follows too (``moco_jax.data.augment.crop_window``, torchvision's sampler):
area in ``augment.crop_scale``, log-uniform aspect ratio in ``augment.crop_ratio``, 10 tries,
then the largest centred crop whose aspect ratio is clamped into ``crop_ratio`` (the whole image
when its own aspect ratio is within). Flip, colour jitter, grayscale, blur, solarize and
normalisation then run on device (``moco_jax.data.augment`` with the crop turned off).

Every random choice is a stateless function of ``(seed, epoch, example index)`` and the record
order of an epoch is a fixed shuffle of ``(seed, epoch)``, so the stream of step ``s`` can be
rebuilt after a restart by skipping records (cheap: nothing is decoded while skipping).
Images that fail to read or decode, and images outside ``MIN_SIDE`` x ``MAX_PIXELS``, are
skipped and counted (``skipped_images`` in the epoch records): never a crash mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from moco_jax.data.augment import CROP_TRIES, augment_batch, crop_window, two_views
from moco_jax.data.tfds_source import holds_paths
from moco_jax.data.windows import EmptyWindow, full_windows
from moco_jax.mesh import DeviceViews, shard_batch, shard_views

SHUFFLE_BUFFER = 16_384
# Images the host will not decode, checked from the header before any decoding: below MIN_SIDE
# pixels on a side (a 1x1 tracking pixel, a broken thumbnail: nothing to crop) or above
# MAX_PIXELS (PIL's decompression-bomb limit: a 20000x20000 PNG of a few kilobytes would take
# 1.2 GB decoded, times the parallel decoders).
MIN_SIDE, MAX_PIXELS = 8, 89_478_485
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CropPair = tuple[np.ndarray, np.ndarray]  # (crops_q, crops_k) of one host batch, uint8


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


def _decode_crop(tf, encoded, window, size, channels):
    """Decode only ``window`` (JPEG) or decode and slice (other formats), then resize."""

    def other():
        image = tf.io.decode_image(encoded, channels, expand_animations=False)
        return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]

    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.image.decode_and_crop_jpeg(encoded, window, channels=channels),
        other,
    )
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def make_crop_fn(config: Any, epoch: int, num_views: int = 2, from_files: bool = False):
    """tf.data map: ``(index, (encoded image, label)) -> (crop_q, crop_k, label)`` (or
    ``(crop, label)`` with ``num_views=1``); ``from_files``: records hold the images' paths."""
    tf = _tf()
    size, channels = config.dataset.image_size, config.dataset.num_channels
    scale, ratio = tuple(config.augment.crop_scale), tuple(config.augment.crop_ratio)

    def crop(index, example):
        encoded, label = example
        if from_files:
            encoded = tf.io.read_file(encoded)
        shape = _image_shape(tf, encoded, channels)
        base = tf.stack([tf.cast(config.seed * 1_000_003 + epoch, tf.int64), index])
        views = []
        for view in range(num_views):
            seed = tf.cast(base + tf.constant([0, view], tf.int64) * (1 << 40), tf.int64)
            window = _crop_window(tf, shape, seed, scale, ratio)
            views.append(_decode_crop(tf, encoded, window, size, channels))
        return (*views, label)

    return crop


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


def records(builder, split: str):
    """This process's ``(index, encoded image, label)`` records, images left undecoded (a
    folder's: ``(index, path, label)``)."""
    import tensorflow_datasets as tfds

    tf = _tf()
    if holds_paths(builder):
        return builder.records(split, jax.process_index(), jax.process_count()).enumerate()
    process_split = split
    if jax.process_count() > 1:
        process_split = tfds.split_for_jax_process(split, drop_remainder=True)
    ds = builder.as_dataset(
        split=process_split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=False),
    )
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))
    return ds.enumerate()


def count_records(builder, split: str) -> int:
    """Examples of ``split`` that this process reads."""
    total = builder.info.splits[split].num_examples
    return total // jax.process_count() if jax.process_count() > 1 else total


def crop_dataset(
    records_ds,
    config: Any,
    epoch: int,
    skip: int,
    batch: int,
    num_views: int = 2,
    read: bool = False,
    positions: bool = False,
):
    """Epoch ``epoch``'s shuffled records from ``skip`` on, ``num_views`` host crops each, batched
    (``read``: the records hold paths, read in the same map; ``positions``: each row's position
    in the epoch's order as a last column).

    Unreadable and undecodable images are dropped (``ignore_errors``); callers count them.
    """
    tf = _tf()
    size = int(records_ds.cardinality())
    buffer = SHUFFLE_BUFFER if size < 0 else max(1, min(size, SHUFFLE_BUFFER))
    ds = records_ds.shuffle(buffer, seed=config.seed * 7919 + epoch, reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(skip)
    crop = make_crop_fn(config, epoch, num_views, read)
    ds = ds.map(
        lambda position, record: (*crop(*record), position) if positions else crop(*record),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.ignore_errors()
    return ds.batch(batch, drop_remainder=False).prefetch(2)


def eval_batches(builder, split: str, config: Any, batch: int, limit: int = 0):
    """``(uint8 images, labels)`` numpy batches of ``split``, centre-cropped, in order."""
    tf = _tf()
    ds = records(builder, split)
    if limit:
        ds = ds.take(limit)
    eval_fn = make_eval_fn(config, holds_paths(builder))
    ds = ds.map(lambda index, example: eval_fn(*example), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors().batch(batch).prefetch(2)
    return ds.as_numpy_iterator()


def make_crop_augment_fn(mesh: Mesh, config: Any, labelled: bool = False):
    """The device half: jitted ``(crops_q, crops_k, rng, step) -> (view_q, view_k, step + 1)``,
    crop turned off (see ``shard_views``); ``labelled``: ``(crops, labels, ...) -> (view,
    labels, ...)``."""
    aug = config.augment.copy_and_resolve_references()
    aug.crop = False  # done on the host
    mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
    size = config.dataset.image_size

    def per_device(crops_q, crops_k, step, rng):
        del step  # the crops already are this step's
        if labelled:
            return augment_batch(rng, crops_q, aug, 0, size, mean, std), crops_k
        return two_views(rng, crops_q, aug, size, mean, std, images_k=crops_k)

    return shard_views(mesh, per_device)


class _Counted:
    """An iterator of row batches that counts the rows it has given (``rows``)."""

    def __init__(self, batches: Iterator):
        self.batches, self.rows = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.rows += len(batch[0])
            yield batch


class StreamingViews:
    """``views(step)`` for datasets streamed from disk: host crops, device augmentation.

    Steps must be asked for in order; asking for another step (a resume) rebuilds the stream
    at that step's position.
    """

    def __init__(self, mesh: Mesh, builder, config: Any, inputs: str = "two_views"):
        self.mesh, self.builder, self.config = mesh, builder, config
        self.local_batch = config.batch_size // jax.process_count()
        self.num_records = count_records(builder, "train")
        self.steps_per_epoch = self.num_records // self.local_batch
        self.skipped_images = 0
        self._iterator: Iterator | None = None
        self._next_step = None
        self._records = records(builder, "train")
        if inputs not in ("two_views", "labelled_view"):
            raise ValueError(f"streamed datasets give two views or one labelled view, not {inputs}")
        self._num_views = 2 if inputs == "two_views" else 1  # else: one crop and its label
        augment = make_crop_augment_fn(mesh, config, labelled=self._num_views == 1)
        self._augment = DeviceViews(mesh, augment, config.seed + 1)

    def _epoch_batches(self, epoch: int, start_step: int) -> Iterator[CropPair]:
        """The batches of ``epoch`` from ``start_step`` on, each its window of the epoch's records
        (``windows.full_windows``: a failed image's slot holds a copy of another of its window);
        once exhausted, the epoch's failed images are added to ``skipped_images``."""
        skip, batch = start_step * self.local_batch, self.local_batch
        read = holds_paths(self.builder)
        args = (self._records, self.config, epoch, skip, batch, self._num_views, read, True)
        decoded = _Counted(crop_dataset(*args).as_numpy_iterator())
        try:
            for *crops, labels, _ in full_windows(decoded, start_step, self.steps_per_epoch, batch):
                yield (crops[0], crops[1]) if len(crops) == 2 else (crops[0], labels)
        except EmptyWindow as err:
            from moco_jax.data.tfds_source import DatasetError

            raise DatasetError(
                f"epoch {epoch + 1}: {err} (is the training data mostly bad?)"
            ) from None
        self.skipped_images += self.num_records - skip - decoded.rows

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint must keep of this pipeline: the undecodable images counted so far
        (and a folder's fingerprint, see ``check_resumable``)."""
        fingerprint = self.builder.fingerprint() if holds_paths(self.builder) else {}
        return {"skipped_images": self.skipped_images, **fingerprint}

    def counters(self) -> dict[str, int]:
        """The epoch record's input counters: images skipped so far (unreadable, undecodable, out
        of bounds), over the whole run."""
        return {"skipped_images": self.skipped_images}

    def check_resumable(self, extra: dict) -> None:
        """Refuse a checkpoint's ``extra`` written over other data (a folder's files changed)."""
        if holds_paths(self.builder):
            self.builder.check_unchanged(extra)

    def restore(self, extra: dict) -> None:
        """Take back ``checkpoint_extra()`` from a restored checkpoint's ``extra``."""
        self.skipped_images = int(extra.get("skipped_images", 0))

    def __call__(self, step: int) -> tuple[jax.Array, jax.Array]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if self._next_step != step or step_in_epoch == 0:
            self._iterator = self._epoch_batches(epoch, step_in_epoch)
        crops_q, crops_k = next(self._iterator)
        self._next_step = step + 1
        if step_in_epoch == self.steps_per_epoch - 1:
            for _ in self._iterator:  # the dropped partial window; counts the epoch's skips
                pass
        crops = (shard_batch(self.mesh, crops_q), shard_batch(self.mesh, crops_k))
        return self._augment(step, *crops)
