"""On-device augmentations: shapes, ranges, randomness, crop statistics and torchvision formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_reference, moco_v2_imagenet
from moco_jax.data import augment


@pytest.fixture(scope="module")
def rgb_images():
    return (np.random.default_rng(0).random((16, 20, 20, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def v2_views():
    """MoCo v2's aug+ (blur included) on RGB, compiled once."""
    config = moco_v2_imagenet.get_config()
    return jax.jit(
        lambda rng, x: augment.two_views(rng, x, config.augment, 16, (0.5,) * 3, (0.25,) * 3)
    )


def test_shapes_ranges_and_determinism(v2_views, rgb_images):
    q, k = v2_views(jax.random.key(0), rgb_images)
    assert q.shape == k.shape == (16, 16, 16, 3) and q.dtype == jnp.float32
    # Normalised from [0, 1] with mean 0.5, std 0.25: values within [-2, 2].
    assert float(q.min()) >= -2.0 - 1e-5 and float(q.max()) <= 2.0 + 1e-5
    q_again, k_again = v2_views(jax.random.key(0), rgb_images)
    np.testing.assert_array_equal(q, q_again)
    np.testing.assert_array_equal(k, k_again)
    q_other, _ = v2_views(jax.random.key(1), rgb_images)
    assert not np.allclose(q, q_other)


def test_views_and_examples_are_augmented_independently(v2_views):
    same = np.repeat(
        (np.random.default_rng(1).random((1, 20, 20, 3)) * 255).astype(np.uint8), 16, 0
    )
    q, k = v2_views(jax.random.key(2), same)
    q = np.asarray(q)
    assert not np.allclose(q, np.asarray(k))  # two views differ
    distinct = {q[i].tobytes() for i in range(16)}
    assert len(distinct) == 16  # every example drew its own parameters


# crop_box runs eagerly, each op compiled once for its shapes and reused by every case (a jitted
# program per case would compile each case's random draws again): the same number of keys and of
# uniform draws in each test.
KEYS = 20000


def crop_boxes(height, width, scale, ratio):
    """``crop_box`` of ``KEYS`` keys split from key 0, as NumPy ``[KEYS, 4]``."""
    keys = jax.random.split(jax.random.key(0), KEYS)
    return np.asarray(jax.vmap(lambda r: augment.crop_box(r, height, width, scale, ratio))(keys))


def crop_windows(uniforms, height, width, scale, ratio):
    """``crop_window`` of each row of ``uniforms`` (``crop_uniforms``), as NumPy."""
    window = lambda *u: augment.crop_window(jnp, height, width, *u, scale, ratio)
    return np.asarray(jax.vmap(window)(*uniforms))


def test_crop_boxes_follow_torchvision_bounds():
    boxes = crop_boxes(28, 28, (0.2, 1.0), (3 / 4, 4 / 3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 28).all() and (left + w <= 28).all()
    area = h * w / 28**2
    # Rounding h and w to integers moves the area a little outside [0.2, 1].
    assert area.min() >= 0.17 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= 0.6 and ratio.max() <= 1.6
    assert abs(np.median(area) - 0.6) < 0.05  # U(0.2, 1) area before rounding
    assert len(set(map(tuple, boxes[:200]))) > 150


def test_crop_fallback_for_impossible_ratios():
    # A 4x40 image cannot hold a crop with aspect ratio in [3/4, 4/3] covering >= 50% area:
    # torchvision falls back to the central crop clipped to the allowed ratio.
    for top, left, h, w in crop_boxes(4, 40, (0.5, 1.0), (3 / 4, 4 / 3))[:100]:
        assert (h, w) == (4, round(4 * 4 / 3)) and top == 0 and left == (40 - w) // 2


def torchvision_fallback(height, width, ratio):
    """torchvision's fallback when no try fits: the largest centred crop with its aspect ratio
    clamped into ``ratio``, restated in plain Python."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:  # whole image
        w = width
        h = height
    return [(height - h) // 2, (width - w) // 2, h, w]


def torchvision_window(height, width, scale, ratio, area_u, ratio_u, top_u, left_u):
    """torchvision's ``RandomResizedCrop.get_params`` restated in plain Python floats, its torch
    draws replaced by the given uniforms in [0, 1) (``randint(0, n)`` as ``int(u * n)``)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for a, r in zip(area_u, ratio_u, strict=True):
        target_area = height * width * (scale[0] + float(a) * (scale[1] - scale[0]))
        aspect_ratio = math.exp(log_ratio[0] + float(r) * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(float(top_u) * (height - h + 1))
            return [top, int(float(left_u) * (width - w + 1)), h, w]
    return torchvision_fallback(height, width, ratio)


# (height, width, scale, ratio): every try fails, so each is torchvision's fallback. Outside
# ``ratio`` (panoramas, tall strips, halves to round) and within it or on its bound (scale > 1).
FALLBACK_CASES = [
    (8, 80, (0.5, 1.0), (3 / 4, 4 / 3)),
    (80, 8, (0.5, 1.0), (3 / 4, 4 / 3)),
    (4, 40, (0.5, 1.0), (3 / 4, 4 / 3)),
    (7, 100, (0.9, 1.0), (0.5, 2.0)),
    (100, 7, (0.9, 1.0), (0.5, 2.0)),
    (12, 12, (1.5, 2.0), (3 / 4, 4 / 3)),
    (9, 12, (1.5, 2.0), (3 / 4, 4 / 3)),
    (30, 20, (1.5, 2.0), (3 / 4, 4 / 3)),
    (10, 2, (0.9, 1.0), (0.8, 1.25)),  # h = round(2.5) = 2: half to even, as Python's round
    (20, 6, (0.9, 1.0), (0.8, 1.25)),  # h = round(7.5) = 8
]
# (height, width, scale, ratio) of random windows: square, photo-like, odd, and one where the
# tries sometimes all fail (a long strip with small areas allowed).
RANDOM_CASES = [
    (28, 28, (0.2, 1.0), (3 / 4, 4 / 3)),
    (224, 300, (0.08, 1.0), (3 / 4, 4 / 3)),
    (375, 500, (0.08, 1.0), (3 / 4, 4 / 3)),
    (37, 61, (0.2, 1.0), (0.5, 2.0)),
    (8, 80, (0.05, 1.0), (3 / 4, 4 / 3)),
]


def crop_uniforms(seed, count):
    """``count`` sets of ``(area_u [10], ratio_u [10], top_u, left_u)`` float32 draws."""
    draws = np.random.default_rng(seed).random((count, 22), dtype=np.float32)
    return draws[:, :10], draws[:, 10:20], draws[:, 20], draws[:, 21]


@pytest.mark.parametrize("height, width, scale, ratio", FALLBACK_CASES)
def test_crop_fallback_is_torchvisions_centred_clamped_crop(height, width, scale, ratio):
    expected = torchvision_fallback(height, width, ratio)
    boxes = crop_boxes(height, width, scale, ratio)
    np.testing.assert_array_equal(boxes, np.tile(expected, (KEYS, 1)))
    uniforms = crop_uniforms(1, 500)
    for u in zip(*uniforms, strict=True):
        assert torchvision_window(height, width, scale, ratio, *u) == expected  # no try fits
    windows = crop_windows(uniforms, height, width, scale, ratio)
    np.testing.assert_array_equal(windows, np.tile(expected, (500, 1)))


@pytest.mark.parametrize("height, width, scale, ratio", RANDOM_CASES)
def test_crop_window_matches_torchvision_on_random_windows(height, width, scale, ratio):
    uniforms = crop_uniforms(2, 500)
    windows = jax.jit(
        jax.vmap(lambda *u: augment.crop_window(jnp, height, width, *u, scale, ratio))
    )(*uniforms)
    expected = [
        torchvision_window(height, width, scale, ratio, *u) for u in zip(*uniforms, strict=True)
    ]
    np.testing.assert_array_equal(windows, np.asarray(expected))


def test_full_image_crop_is_the_identity():
    image = jnp.asarray(np.random.default_rng(0).random((12, 12, 1)), jnp.float32)
    resized_crop = jax.jit(augment.resized_crop, static_argnums=2)  # one compile, both boxes
    out = resized_crop(image, jnp.asarray([0, 0, 12, 12]), 12)
    np.testing.assert_allclose(out, image, atol=1e-6)
    # A crop of the top-left quarter upsampled 2x keeps that corner's mean.
    out = resized_crop(image, jnp.asarray([0, 0, 6, 6]), 12)
    np.testing.assert_allclose(float(out.mean()), float(image[:6, :6].mean()), atol=0.02)


def _numpy_gray(x):
    return x @ np.array([0.299, 0.587, 0.114])


def test_color_jitter_single_ops_match_torchvision_formulas():
    """Each op alone (others at strength 0) against torchvision's definition in NumPy."""
    image = np.random.default_rng(3).random((6, 6, 3)).astype(np.float32)
    rng = jax.random.key(7)
    order_rng, b_rng, c_rng, s_rng, h_rng = jax.random.split(rng, 5)

    def factor(key, amount):
        return float(jax.random.uniform(key, minval=max(0.0, 1 - amount), maxval=1 + amount))

    out = np.asarray(augment.color_jitter(rng, jnp.asarray(image), (0.4, 0, 0, 0)))
    np.testing.assert_allclose(out, np.clip(image * factor(b_rng, 0.4), 0, 1), atol=1e-6)

    out = np.asarray(augment.color_jitter(rng, jnp.asarray(image), (0, 0.4, 0, 0)))
    c = factor(c_rng, 0.4)
    expected = np.clip(c * image + (1 - c) * _numpy_gray(image).mean(), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)

    out = np.asarray(augment.color_jitter(rng, jnp.asarray(image), (0, 0, 0.4, 0)))
    s = factor(s_rng, 0.4)
    expected = np.clip(s * image + (1 - s) * _numpy_gray(image)[..., None], 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)

    out = np.asarray(augment.color_jitter(rng, jnp.asarray(image), (0, 0, 0, 0.1)))
    shift = float(jax.random.uniform(h_rng, minval=-0.1, maxval=0.1))
    import colorsys

    expected = np.array(
        [
            colorsys.hsv_to_rgb(
                (colorsys.rgb_to_hsv(*px)[0] + shift) % 1.0, *colorsys.rgb_to_hsv(*px)[1:]
            )
            for px in image.reshape(-1, 3)
        ]
    ).reshape(image.shape)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_grayscale_images_work_and_colour_ops_are_no_ops():
    """MoCo v1's views of one-channel images (the crop off: it is the same code for any number
    of channels, and every Fashion-MNIST run crops one channel), and the colour jitter's
    saturation and hue leaving such an image as it is, in one compiled program."""
    config = fashion_mnist_reference.get_config()
    config.augment.crop = False
    images = (np.random.default_rng(0).random((8, 28, 28, 1)) * 255).astype(np.uint8)
    image = jnp.asarray(images[0] / 255.0, jnp.float32)

    def views_and_jitter(rng, x, image):
        views = augment.two_views(rng, x, config.augment, 28, (0.28604,), (0.35302,))
        return views, augment.color_jitter(rng, image, (0, 0, 0.9, 0.5))

    (q, k), jittered = jax.jit(views_and_jitter)(jax.random.key(0), images, image)
    assert q.shape == k.shape == (8, 28, 28, 1) and not np.allclose(q, k)
    # Saturation and hue need colour: on one channel they leave the image unchanged.
    np.testing.assert_array_equal(jittered, image)


def test_grayscale_makes_rgb_channels_equal():
    """Grayscale alone: crop and flip (which treat every channel alike, and compile for seconds)
    are off."""
    config = moco_v2_imagenet.get_config()
    config.augment.grayscale_prob = 1.0
    config.augment.blur_prob = (0.0, 0.0)
    config.augment.jitter_prob = 0.0
    config.augment.crop = config.augment.flip = False
    images = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    out = jax.jit(
        lambda r, x: augment.augment_batch(r, x, config.augment, 0, 16, (0.0,) * 3, (1.0,) * 3)
    )(jax.random.key(0), images)
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
    np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-6)


def test_solarize_and_blur_probabilities_are_per_view():
    config = moco_v2_imagenet.get_config()
    aug = config.augment
    aug.update(crop=False, flip=False, jitter_prob=0.0, grayscale_prob=0.0)
    aug.blur_prob, aug.solarize_prob = (0.0, 0.0), (0.0, 1.0)
    images = (np.random.default_rng(0).random((4, 8, 8, 3)) * 255).astype(np.uint8)
    q, k = augment.two_views(jax.random.key(0), images, aug, 8, (0.0,) * 3, (1.0,) * 3)
    x = images / 255.0
    np.testing.assert_allclose(q, x, atol=1e-6)  # query view untouched
    np.testing.assert_allclose(k, np.where(x < 0.5, x, 1 - x), atol=1e-6)  # key view solarised
    assert math.isclose(float(np.asarray(q).mean()), float(x.mean()), rel_tol=1e-5)
