"""MoCo v3's contrastive loss (moco-v3 ``moco/builder.py``, ``contrastive_loss``).

Per device, inside ``shard_map`` over the ``data`` axis: queries ``q [N, D]`` of this device,
keys of every device gathered in device order (``concat_all_gather``, no gradient), logits
``q k_all^T / T`` of shape ``[N, N * R]``, and the positive of row ``i`` on device ``r`` is key
``i + N * r`` (the same image's other view). The per-device mean cross-entropy is multiplied by
``2 T``; the step adds ``ctr(q1, k2) + ctr(q2, k1)``. No queue: the negatives are the other
images of the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from moco_jax.algorithms.info_nce import l2_normalize


def positive_indices(rows: int, axis_name: str) -> jax.Array:
    """``i + N * r`` for the ``N = rows`` rows of device ``r`` (moco-v3's ``labels``)."""
    return jnp.arange(rows, dtype=jnp.int32) + rows * jax.lax.axis_index(axis_name)


def gathered_keys(k: jax.Array, axis_name: str) -> jax.Array:
    """L2-normalised keys of every device, in device order, without gradient ``[N * R, D]``."""
    k = jax.lax.stop_gradient(l2_normalize(k))
    return jax.lax.all_gather(k, axis_name, axis=0, tiled=True)


def contrastive_loss(
    q: jax.Array, k_all: jax.Array, temperature: float, axis_name: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(2 T * mean cross-entropy, logits, labels)`` of this device's unnormalised queries
    against ``gathered_keys``."""
    logits = l2_normalize(q) @ k_all.T / temperature
    labels = positive_indices(q.shape[0], axis_name)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(loss) * (2.0 * temperature), logits, labels
