"""On-device augmentations: shapes, ranges, randomness, crop statistics and torchvision formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_reference, moco_v2_imagenet
from moco_jax import augment


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


def test_crop_boxes_follow_torchvision_bounds():
    boxes = jax.vmap(lambda r: augment.crop_box(r, 28, 28, (0.2, 1.0), (3 / 4, 4 / 3)))(
        jax.random.split(jax.random.key(0), 20000)
    )
    top, left, h, w = np.asarray(boxes).T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 28).all() and (left + w <= 28).all()
    area = h * w / 28**2
    # Rounding h and w to integers moves the area a little outside [0.2, 1].
    assert area.min() >= 0.17 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= 0.6 and ratio.max() <= 1.6
    assert abs(np.median(area) - 0.6) < 0.05  # U(0.2, 1) area before rounding
    assert len(set(map(tuple, np.asarray(boxes)[:200]))) > 150


def test_crop_fallback_for_impossible_ratios():
    # A 4x40 image cannot hold a crop with aspect ratio in [3/4, 4/3] covering >= 50% area:
    # torchvision falls back to the central crop clipped to the allowed ratio.
    box = augment.crop_box(jax.random.key(0), 4, 40, (0.5, 1.0), (3 / 4, 4 / 3))
    top, left, h, w = np.asarray(box)
    assert (h, w) == (4, round(4 * 4 / 3)) and top == 0 and left == (40 - w) // 2


def test_full_image_crop_is_the_identity():
    image = jnp.asarray(np.random.default_rng(0).random((12, 12, 1)), jnp.float32)
    out = augment.resized_crop(image, jnp.asarray([0, 0, 12, 12]), 12)
    np.testing.assert_allclose(out, image, atol=1e-6)
    # A crop of the top-left quarter upsampled 2x keeps that corner's mean.
    out = augment.resized_crop(image, jnp.asarray([0, 0, 6, 6]), 12)
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
    config = fashion_mnist_reference.get_config()
    images = (np.random.default_rng(0).random((8, 28, 28, 1)) * 255).astype(np.uint8)
    q, k = jax.jit(
        lambda r, x: augment.two_views(r, x, config.augment, 28, (0.28604,), (0.35302,))
    )(jax.random.key(0), images)
    assert q.shape == (8, 28, 28, 1)
    image = jnp.asarray(images[0] / 255.0, jnp.float32)
    # Saturation and hue need colour: on one channel they leave the image unchanged.
    np.testing.assert_array_equal(
        augment.color_jitter(jax.random.key(0), image, (0, 0, 0.9, 0.5)), image
    )


def test_grayscale_makes_rgb_channels_equal():
    config = moco_v2_imagenet.get_config()
    config.augment.grayscale_prob = 1.0
    config.augment.blur_prob = (0.0, 0.0)
    config.augment.jitter_prob = 0.0
    images = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    out = augment.augment_batch(
        jax.random.key(0), images, config.augment, 0, 16, (0.0,) * 3, (1.0,) * 3
    )
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
