"""MoCo's data augmentations as jitted JAX on device, with per-example random parameters.

Each op follows torchvision's semantics (the reference pipelines are torchvision's), on float
images in [0, 1], ``[H, W, C]`` per example and vmapped over the batch:

- random-resized-crop: torchvision's sampler (10 tries of area in ``scale`` and log-uniform
  aspect ratio in ``ratio``, then the largest centred crop with its aspect ratio clamped into
  ``ratio``), integer crop boxes, bilinear resize with antialiasing (as PIL's bilinear resize
  when shrinking). The sampler, ``crop_window``, is written once against an array namespace:
  streamed datasets crop on the host with the same rule (``moco_jax.data.streaming``);
- horizontal flip with p=0.5;
- colour jitter (applied with ``jitter_prob``): brightness, contrast, saturation and hue factors
  drawn as torchvision does and applied in a random order per example; on one channel only
  brightness and contrast act (saturation and hue need colour);
- random grayscale (ITU-R 601 weights as torchvision; a no-op on one channel);
- Gaussian blur with sigma ~ U(blur_sigma) (MoCo v2), solarize at 0.5 (MoCo v3 recipe);
- normalisation with the dataset mean/std.

Gaussian blur and the HSV conversion come from dm-pix.
"""

from __future__ import annotations

import math
from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
CROP_TRIES = 10


def _grayscale(image: jax.Array) -> jax.Array:
    """``[H, W, 1]`` luminance of an RGB image (the image itself when it has one channel)."""
    if image.shape[-1] == 1:
        return image
    return jnp.tensordot(image, jnp.asarray(GRAY_WEIGHTS, image.dtype), axes=([-1], [0]))[..., None]


def crop_window(xp: Any, height, width, area_u, ratio_u, top_u, left_u, scale, ratio):
    """``[top, left, h, w]`` (int32) of torchvision's ``RandomResizedCrop.get_params``, from
    uniform draws in [0, 1): the one definition of the crop rule, used by both input paths.

    ``CROP_TRIES`` tries draw the area in ``scale`` (times the image's) and the log aspect ratio
    in ``log(ratio)``; the first window that fits is taken, placed by ``top_u`` and ``left_u``.
    When none fits, torchvision's fallback: the largest centred crop whose aspect ratio is clamped
    into ``ratio`` (``in_ratio < min``: full width, ``h = round(w / min)``; ``in_ratio > max``:
    full height, ``w = round(h * max)``; otherwise the whole image).

    ``xp``: the array namespace, ``jax.numpy`` on device or the host's TensorFlow adapter
    (``moco_jax.data.streaming``); it needs ``float32``, ``int32``, ``asarray``, ``astype``,
    ``maximum``, ``exp``, ``sqrt``, ``round`` (half to even, as Python's), ``floor``, ``where``,
    ``argmax``, ``any`` and ``stack``. ``height``, ``width``: ints or scalar tensors (dynamic on
    the host). ``area_u``, ``ratio_u``: ``[CROP_TRIES]`` draws; ``top_u``, ``left_u``: scalars.
    All arithmetic is float32, ``area_u`` and ``ratio_u`` mapped onto their ranges exactly as
    ``jax.random.uniform(minval, maxval)`` does.
    """
    f32 = xp.float32
    height, width = xp.asarray(height, f32), xp.asarray(width, f32)

    def between(u, low, high):
        low, high = xp.asarray(low, f32), xp.asarray(high, f32)
        return xp.maximum(low, u * (high - low) + low)

    target_area = height * width * between(area_u, scale[0], scale[1])
    aspect = xp.exp(between(ratio_u, math.log(ratio[0]), math.log(ratio[1])))
    w = xp.round(xp.sqrt(target_area * aspect))
    h = xp.round(xp.sqrt(target_area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found, first = xp.any(valid), xp.argmax(valid)

    low, high = xp.asarray(min(ratio), f32), xp.asarray(max(ratio), f32)
    in_ratio = width / height
    fallback_w = xp.where(in_ratio > high, xp.round(height * high), width)
    fallback_h = xp.where(in_ratio < low, xp.round(width / low), height)
    h = xp.where(found, h[first], fallback_h)
    w = xp.where(found, w[first], fallback_w)
    top = xp.where(found, xp.floor(top_u * (height - h + 1)), xp.floor((height - h) / 2))
    left = xp.where(found, xp.floor(left_u * (width - w + 1)), xp.floor((width - w) / 2))
    return xp.astype(xp.stack([top, left, h, w]), xp.int32)


def crop_box(
    rng: jax.Array, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> jax.Array:
    """``[top, left, h, w]`` (int32) of torchvision's ``RandomResizedCrop.get_params``
    (``crop_window`` on device, its uniforms drawn from ``rng``)."""
    area_rng, ratio_rng, top_rng, left_rng = jax.random.split(rng, 4)
    area_u = jax.random.uniform(area_rng, (CROP_TRIES,))
    ratio_u = jax.random.uniform(ratio_rng, (CROP_TRIES,))
    top_u, left_u = jax.random.uniform(top_rng), jax.random.uniform(left_rng)
    return crop_window(jnp, height, width, area_u, ratio_u, top_u, left_u, scale, ratio)


def resized_crop(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
    """Crop ``box`` out of ``image`` and resize it to ``size x size`` (bilinear, antialiased)."""
    top, left, h, w = (box[i].astype(jnp.float32) for i in range(4))
    scale = jnp.stack([size / h, size / w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(
        image, (size, size, image.shape[-1]), (0, 1), scale, translation, method="linear"
    )


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def _adjust_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
    hsv = pix.rgb_to_hsv(image)
    hue = jnp.mod(hsv[..., 0] + shift, 1.0)
    return jnp.clip(pix.hsv_to_rgb(jnp.stack([hue, hsv[..., 1], hsv[..., 2]], -1)), 0.0, 1.0)


def color_jitter(rng: jax.Array, image: jax.Array, strength: tuple[float, ...]) -> jax.Array:
    """torchvision ``ColorJitter(brightness, contrast, saturation, hue)``, random op order."""
    b, c, s, h = strength
    order_rng, b_rng, c_rng, s_rng, h_rng = jax.random.split(rng, 5)

    def factor(key, amount):
        return jax.random.uniform(key, minval=max(0.0, 1.0 - amount), maxval=1.0 + amount)

    brightness, contrast, saturation = factor(b_rng, b), factor(c_rng, c), factor(s_rng, s)
    hue = jax.random.uniform(h_rng, minval=-h, maxval=h)
    colour = image.shape[-1] == 3
    ops = [
        lambda x: _blend(x, jnp.zeros_like(x), brightness) if b > 0 else x,
        lambda x: _blend(x, jnp.mean(_grayscale(x)), contrast) if c > 0 else x,
        lambda x: _blend(x, _grayscale(x), saturation) if s > 0 and colour else x,
        lambda x: _adjust_hue(x, hue) if h > 0 and colour else x,
    ]
    order = jax.random.permutation(order_rng, 4)
    for position in range(4):
        image = jax.lax.switch(order[position], ops, image)
    return image


def _maybe(rng: jax.Array, prob: float, fn, image: jax.Array) -> jax.Array:
    """``fn(image)`` with probability ``prob`` (statically skipped when 0)."""
    if prob <= 0:
        return image
    if prob >= 1:
        return fn(image)
    return jnp.where(jax.random.uniform(rng) < prob, fn(image), image)


def augment_image(
    rng: jax.Array, image: jax.Array, aug: Any, view: int, out_size: int
) -> jax.Array:
    """One view of one ``[H, W, C]`` float image in [0, 1] (before normalisation)."""
    keys = jax.random.split(rng, 8)
    if aug.crop:
        box = crop_box(keys[0], image.shape[0], image.shape[1], aug.crop_scale, aug.crop_ratio)
        image = resized_crop(image, box, out_size)
    image = jnp.clip(image, 0.0, 1.0)
    if aug.flip:
        image = _maybe(keys[1], 0.5, lambda x: x[:, ::-1], image)

    def jitter(x):
        return _maybe(keys[2], aug.jitter_prob, lambda y: color_jitter(keys[3], y, aug.jitter), x)

    def gray(x):
        return _maybe(
            keys[4], aug.grayscale_prob, lambda y: jnp.broadcast_to(_grayscale(y), y.shape), x
        )

    image = jitter(gray(image)) if aug.grayscale_before_jitter else gray(jitter(image))
    blur_prob, solarize_prob = aug.blur_prob[view], aug.solarize_prob[view]
    if blur_prob > 0:
        kernel = 2 * int(round(0.05 * out_size)) + 1  # ~10% of the image, odd (23 at 224)
        sigma = jax.random.uniform(keys[5], minval=aug.blur_sigma[0], maxval=aug.blur_sigma[1])
        image = _maybe(keys[6], blur_prob, lambda x: pix.gaussian_blur(x, sigma, kernel), image)
    image = _maybe(keys[7], solarize_prob, lambda x: pix.solarize(x, 0.5), image)
    return image


def augment_batch(
    rng: jax.Array,
    images: jax.Array,
    aug: Any,
    view: int,
    out_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> jax.Array:
    """Augment a uint8 ``[N, H, W, C]`` batch into normalised float32 ``[N, S, S, C]``.

    ``view`` (0 = query, 1 = key) selects the per-view blur/solarize probabilities.
    """
    floats = images.astype(jnp.float32) / 255.0
    keys = jax.random.split(rng, images.shape[0])
    out = jax.vmap(lambda k, x: augment_image(k, x, aug, view, out_size))(keys, floats)
    return (out - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def two_views(
    rng: jax.Array,
    images: jax.Array,
    aug: Any,
    out_size: int,
    mean: tuple,
    std: tuple,
    images_k: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The query and key views of a uint8 batch, independently augmented.

    ``images_k``: the key view's own source (the host's second crop of each image, for streamed
    datasets); by default both views come from ``images``.
    """
    q_rng, k_rng = jax.random.split(rng)
    return (
        augment_batch(q_rng, images, aug, 0, out_size, mean, std),
        augment_batch(k_rng, images if images_k is None else images_k, aug, 1, out_size, mean, std),
    )


def normalize_only(images: jax.Array, mean: tuple, std: tuple) -> jax.Array:
    """Evaluation transform: uint8 -> float in [0, 1] -> normalised (no augmentation)."""
    floats = images.astype(jnp.float32) / 255.0
    return (floats - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
