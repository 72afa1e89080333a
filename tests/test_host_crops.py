"""What the host makes of a JPEG, restated independently: the streamed views must stay these.

A view of record ``index`` in epoch ``epoch`` is: the whole JPEG decoded (TensorFlow's decoder),
the window of torchvision's sampler seeded by ``(seed, epoch, index, view)`` cut out of it, and
that window resized to ``S x S`` bilinearly with antialiasing (the triangle filter widened by the
scale factor, as PIL's bilinear resize and torchvision's on PIL images), rounded to uint8. These
tests compute that with nothing of the pipeline but the sampler (pinned to torchvision's by
``test_streaming.py``) and compare: the pipeline's speed work (one decode for both views, the
resize op) must not change a view.
"""

import io

import numpy as np
import pytest
from PIL import Image

from moco_jax.data.host_crops import _crop_window, _tf
from moco_jax.data.streaming import crop_dataset
from tiny import tiny_config

SIZE = 32
# Photo-like sizes: odd ones, a portrait, a panorama, one smaller than SIZE on a side.
SHAPES = [(120, 160), (97, 131), (161, 75), (48, 200), (200, 150), (30, 41)]


def _photo(rng, height, width):
    """Smooth colour fields with edges and sensor noise: JPEG content that is neither flat nor
    white noise."""
    low = rng.uniform(0, 255, (height // 12 + 2, width // 12 + 2, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.float32)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpegs():
    rng = np.random.default_rng(5)
    encoded = []
    for height, width in SHAPES:
        buffer = io.BytesIO()
        Image.fromarray(_photo(rng, height, width)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def _config():
    config = tiny_config(**{"dataset.image_size": SIZE, "seed": 11})
    config.dataset.num_channels = 3
    return config


def _streamed(config, epoch, encoded):
    """The pipeline's two views of each image, in record order."""
    tf = _tf()
    records = tf.data.Dataset.from_tensor_slices((encoded, np.arange(len(encoded), dtype=np.int32)))
    batch = next(crop_dataset(records.enumerate(), config, epoch, 0, 64).as_numpy_iterator())
    order = np.argsort(batch[2])
    return batch[0][order], batch[1][order]


def _windows(config, epoch, index, height, width):
    """The sampler's two windows of record ``index``: seeds ``(seed * 1_000_003 + epoch,
    index + view * 2 ** 40)``."""
    tf = _tf()
    scale, ratio = tuple(config.augment.crop_scale), tuple(config.augment.crop_ratio)
    shape = tf.constant([height, width], tf.int32)
    return [
        _crop_window(tf, shape, tf.constant(seed, tf.int64), scale, ratio).numpy()
        for seed in ([config.seed * 1_000_003 + epoch, index + view * (1 << 40)] for view in (0, 1))
    ]


def _reference(config, epoch, index, encoded):
    """Both views restated: the whole image decoded, the window sliced, resized, rounded."""
    tf = _tf()
    image = tf.io.decode_jpeg(encoded, channels=3)
    views = []
    for top, left, h, w in _windows(config, epoch, index, *image.shape[:2]):
        window = tf.cast(image[top : top + h, left : left + w], tf.float32)
        resized = tf.image.resize(window, [SIZE, SIZE], method="bilinear", antialias=True)
        views.append(np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8))
    return views


@pytest.mark.parametrize("epoch", [0, 3])
def test_streamed_views_are_the_decoded_windows_resized(jpegs, epoch):
    """Equal, pixel for pixel. (Until the views shared one decode, each window was decoded on
    its own by ``decode_and_crop_jpeg``, which upsamples the chroma of the crop's edge column
    without its outside neighbour: those views were equal but in the 1 to 3 outer output
    columns each side, by up to 17 levels.)"""
    config = _config()
    crops_q, crops_k = _streamed(config, epoch, jpegs)
    for index, encoded in enumerate(jpegs):
        views = _reference(config, epoch, index, encoded)
        for crop, view in zip((crops_q[index], crops_k[index]), views, strict=True):
            np.testing.assert_array_equal(crop, view)


def test_streamed_views_match_torchvision_on_pil(jpegs):
    """torchvision's ``resized_crop`` on a PIL image (PIL decodes, crops, resizes bilinearly)
    of the same windows: within 1.5 grey levels on average and 16 at worst (0.97 and 11 here).
    PIL's decoder uses libjpeg's accurate integer DCT and TensorFlow's the fast one (about 1
    level on average, up to 5), and PIL resizes in fixed point; the worst are at sharp edges."""
    config = _config()
    crops_q, crops_k = _streamed(config, 0, jpegs)
    diffs = []
    for index, encoded in enumerate(jpegs):
        image = Image.open(io.BytesIO(encoded)).convert("RGB")
        windows = _windows(config, 0, index, image.height, image.width)
        for crop, (top, left, h, w) in zip((crops_q[index], crops_k[index]), windows, strict=True):
            box = (int(left), int(top), int(left + w), int(top + h))
            pil = np.asarray(image.crop(box).resize((SIZE, SIZE), Image.BILINEAR), np.int32)
            diffs.append(np.abs(crop.astype(np.int32) - pil))
    diffs = np.stack(diffs)
    assert diffs.mean() < 1.5 and diffs.max() <= 16, (diffs.mean(), diffs.max())
