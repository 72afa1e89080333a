"""The FIFO queue of negative keys: initialisation and enqueue with wrap-around."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moco_jax.algorithms.info_nce import l2_normalize


def init_queue(rng: jax.Array, size: int, dim: int) -> jax.Array:
    """``[size, dim]`` random unit vectors, as the reference initialises its queue."""
    return l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))


def enqueue(queue: jax.Array, pointer: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write ``keys`` over the oldest entries starting at ``pointer``, wrapping past the end.

    Unlike the reference (which asserts ``K % batch == 0``) any ``K >= len(keys)`` works: the
    rows that do not fit before the end land at the start of the queue.
    """
    size = queue.shape[0]
    rows = (pointer + jnp.arange(keys.shape[0], dtype=jnp.int32)) % size
    new_queue = queue.at[rows].set(keys.astype(queue.dtype), unique_indices=True)
    return new_queue, ((pointer + keys.shape[0]) % size).astype(jnp.int32)
