"""InfoNCE as MoCo computes it: positive at index 0 of ``[q.k+, q.k-_1 .. q.k-_K] / T``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows divided by their L2 norm (``F.normalize(x, dim=1)``: norm clamped at ``eps``)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def moco_logits(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float) -> jax.Array:
    """``[N, 1 + K]`` logits: column 0 is ``q . k`` (positive), the rest ``q . queue`` (negatives).

    ``q`` and ``k`` are ``[N, D]`` L2-normalised rows, ``queue`` is ``[K, D]``.
    """
    positive = jnp.sum(q * k, axis=-1, keepdims=True)
    negatives = q @ queue.T
    return jnp.concatenate([positive, negatives], axis=-1) / temperature


def info_nce(logits: jax.Array) -> jax.Array:
    """Per-example cross-entropy with the positive at index 0."""
    labels = jnp.zeros(logits.shape[0], dtype=jnp.int32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
