"""Nearest neighbours by the kNN monitor's similarity, for looking at them: which training images
a test image's features are closest to (``evaluate show``'s ``neighbours.png``).

The similarity is the monitor's: the dot product of L2-normalised features (cosine), computed at
full float32 precision; rows labelled -1 (a streamed source's padding) are never neighbours, and
among equal similarities the lower bank row comes first (``lax.top_k``'s rule, as in
``knn.ranked``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def nearest(
    queries: np.ndarray,
    bank: jax.Array,
    bank_labels: jax.Array,
    k: int,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Similarities and bank rows ``[Q, k]`` of the ``k`` bank rows most similar to each query
    (host rows), most similar first. ``exclude``: one bank row per query that may not be its
    neighbour (the query itself, when the queries come from the bank)."""
    similarity = _similarity(np.asarray(queries), bank, bank_labels)
    if isinstance(similarity.sharding, NamedSharding):  # bank rows split: [Q, N] whole, once
        similarity = jax.device_put(similarity, NamedSharding(similarity.sharding.mesh, P()))
    if exclude is None:
        exclude = np.full(len(queries), -1)
    top, rows = _top_k(similarity, np.asarray(exclude), k)
    return np.asarray(jax.device_get(top)), np.asarray(jax.device_get(rows))


@jax.jit
def _similarity(queries, bank, bank_labels):
    similarity = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(bank_labels[None, :] >= 0, similarity, -jnp.inf)


@functools.partial(jax.jit, static_argnames="k")
def _top_k(similarity, exclude, k):
    rows = jnp.arange(similarity.shape[1])[None, :]
    return jax.lax.top_k(jnp.where(rows == exclude[:, None], -jnp.inf, similarity), k)


def take_rows(array: jax.Array, rows) -> np.ndarray:
    """``array[rows]`` on the host, for an array whose rows are split over the devices."""
    rows = jnp.asarray(np.asarray(rows))
    sharding = array.sharding
    if isinstance(sharding, NamedSharding):
        return np.asarray(
            jax.device_get(array.at[rows].get(out_sharding=NamedSharding(sharding.mesh, P())))
        )
    return np.asarray(jax.device_get(array[rows]))


def rows_of(source, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of rows ``wanted`` of ``source`` (its batches concatenated, as
    ``monitor.collect`` orders them), on the host, in the order asked for."""
    wanted = np.asarray(wanted).reshape(-1)
    images, labels = {}, {}
    start = 0
    for batch_images, batch_labels in source():
        count = batch_images.shape[0]
        here = np.unique(wanted[(wanted >= start) & (wanted < start + count)])
        if len(here):
            # The batch whole to the host: one copy, no gather compiled per set of rows.
            picked = np.asarray(jax.device_get(batch_images))[here - start]
            picked_labels = np.asarray(jax.device_get(batch_labels))[here - start]
            for row, image, label in zip(here, picked, picked_labels, strict=True):
                images[row], labels[row] = image, label
        start += count
        if len(images) == len(set(wanted.tolist())):
            break  # a streamed source need not be read to its end
    return np.stack([images[r] for r in wanted]), np.array([labels[r] for r in wanted])
