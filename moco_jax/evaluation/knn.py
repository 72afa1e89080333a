"""Weighted kNN accuracy on frozen features: the MoCo demo's monitor, on device and batched.

For each test feature: cosine similarity to every memory-bank feature, the ``k`` most similar,
weights ``exp(sim / t)``, per-class sums of weights, prediction = the class with the largest sum
(the official CIFAR demo's ``knn_predict`` with k=200, t=0.1). Features are L2-normalised.
On a mesh the memory bank stays split over the devices (``make_knn_counts_fn``); the tests
hold the whole-bank reference (``ranked`` then ``vote``) that the split one must match.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moco_jax.algorithms.info_nce import l2_normalize
from moco_jax.mesh import DATA_AXIS

# Similarities a device holds at once while ranking its bank block (64 MiB of float32): test rows
# are walked in steps of about BLOCK / (bank rows) rows a device.
BLOCK = 2**24


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The chunk size used to walk ``n`` rows in equal pieces of at most ``limit``."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def ranked(
    features: jax.Array, bank: jax.Array, bank_labels: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """Similarities and labels of the ``k`` bank rows most similar to each row of ``features``,
    most similar first; among equal similarities the lower bank row first (``lax.top_k``'s rule).
    Bank rows with label -1 (padding) are at -inf: they are ranked last and never vote."""
    # Full float32 products: TPUs otherwise multiply float32 in one bfloat16 pass, which would
    # reorder near neighbours (and break ties differently) from the float32 reference.
    similarity = jnp.matmul(features, bank.T, precision=jax.lax.Precision.HIGHEST)
    similarity = jnp.where(bank_labels[None, :] >= 0, similarity, -jnp.inf)
    top_sim, top_index = jax.lax.top_k(similarity, k)
    return top_sim, bank_labels[top_index]


def vote(top_sim: jax.Array, top_labels: jax.Array, num_classes: int, temperature: float):
    """The class with the largest sum of ``exp(sim / t)`` over the neighbours ``[..., k]``."""
    weights = jnp.exp(top_sim / temperature)
    votes = jax.nn.one_hot(top_labels, num_classes) * weights[..., None]
    return jnp.argmax(jnp.sum(votes, axis=-2), axis=-1)


def make_feature_fn(
    mesh: Mesh,
    model: nn.Module,
    transform: Callable[[jax.Array], jax.Array],
    max_chunk: int = 512,
    normalize: bool = True,
):
    """Jitted ``(variables, images) -> (head, backbone)`` features, L2-normalised unless
    ``normalize`` is False, sharded rows.

    Runs the encoder in evaluation mode (BN running statistics) over each device's rows in
    chunks of at most ``max_chunk``.
    """

    def per_device(variables, images):
        n = images.shape[0]
        chunk = largest_divisor_at_most(n, max_chunk)

        def embed(batch):
            backbone, head = model.apply(variables, transform(batch), train=False)
            if not normalize:
                return head, backbone
            return l2_normalize(head), l2_normalize(backbone)

        head, backbone = jax.lax.map(embed, images.reshape(n // chunk, chunk, *images.shape[1:]))
        return head.reshape(n, -1), backbone.reshape(n, -1)

    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(DATA_AXIS)),
            out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
        )
    )


def sharded_predict(features, bank, bank_labels, num_classes, k, temperature, block):
    """Inside ``shard_map`` over ``data``: predictions for this device's test rows ``[m, D]``,
    each device holding one contiguous block of bank rows ``[S, D]`` (device r: global rows
    ``[r*S, (r+1)*S)``).

    Walks the test rows in steps: every device contributes ``size`` rows, all-gathered (``[n *
    size, D]``); each device ranks its bank block for all of them (a ``[n * size, S]`` similarity
    block of at most ``block`` entries: ``size`` is about ``block / N`` whatever the number of
    devices, so a bigger pod walks its smaller share of test rows in fewer steps of the same
    memory) and keeps its ``min(k, S)`` best; an all-to-all hands
    every device the candidates of its own rows from every block, in device order, and a
    ``top_k`` over those ``n * min(k, S)`` gives the global ``k`` nearest. ``top_k`` takes the
    lower position first among equal values, and positions are block-major with each block in
    its own rank order, so ties go to the lower global bank row: the neighbours, their order and
    so the vote are those of ``vote(*ranked(...))`` on the whole bank (given the same
    similarities: a backend whose matmul sums in another order for other shapes may round them
    differently).
    """
    devices = jax.lax.axis_size(DATA_AXIS)
    rows, shard = features.shape[0], bank.shape[0]
    if k > devices * shard:
        raise ValueError(f"k={k} is larger than the memory bank ({devices * shard} rows)")
    size = largest_divisor_at_most(rows, max(1, block // (devices * shard)))
    local_k = min(k, shard)

    def predict(local_rows):
        gathered = jax.lax.all_gather(local_rows, DATA_AXIS, tiled=True)
        candidates = ranked(gathered, bank, bank_labels, local_k)
        # [devices (whose test rows), size, local_k] -> [devices (whose bank block), size, ...]
        sims, labels = (
            jax.lax.all_to_all(c.reshape(devices, size, local_k), DATA_AXIS, 0, 0)
            for c in candidates
        )
        sims, labels = (
            c.transpose(1, 0, 2).reshape(size, devices * local_k) for c in (sims, labels)
        )
        top_sim, position = jax.lax.top_k(sims, k)
        top_labels = jnp.take_along_axis(labels, position, axis=1)
        return vote(top_sim, top_labels, num_classes, temperature)

    chunks = features.reshape(rows // size, size, -1)
    return jax.lax.map(predict, chunks).reshape(rows)


def jit_rows_sharded(mesh: Mesh, per_device, num_args: int, out_specs):
    """Jitted ``shard_map`` of ``per_device`` with every argument's rows split over ``data``.
    Arguments sharded otherwise (host arrays, a replicated bank) are resharded first; rows
    already split over ``data`` stay where they are."""
    rows = NamedSharding(mesh, P(DATA_AXIS))
    mapped = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(DATA_AXIS),) * num_args, out_specs=out_specs
    )
    return jax.jit(lambda *args: mapped(*(jax.sharding.reshard(a, rows) for a in args)))


def make_knn_counts_fn(
    mesh: Mesh, num_classes: int, k: int, temperature: float, block: int = BLOCK
):
    """Jitted ``(test_feats, test_labels, bank, bank_labels) -> (correct, counted)``, all four
    sharded over ``data`` (rows split evenly), the bank never replicated: each device holds 1/n
    of it, and the similarity block has at most ``block`` entries. Ties go to the lower row of
    ``bank`` as a global array (its row order, not where the rows sit; for the monitor's bank,
    concatenated from a source's batches, the order of the batches): the same neighbours as on
    the whole bank. Test rows with label -1 (padding) are not counted."""

    def per_device(features, labels, bank, bank_labels):
        predictions = sharded_predict(
            features, bank, bank_labels, num_classes, k, temperature, block
        )
        valid = labels >= 0
        correct = jnp.sum((predictions == labels) & valid)
        return jax.lax.psum(correct, DATA_AXIS), jax.lax.psum(jnp.sum(valid), DATA_AXIS)

    return jit_rows_sharded(mesh, per_device, 4, (P(), P()))


def accuracy_of(counts_fn, features, labels, bank, bank_labels) -> float:
    """Top-1 accuracy (a fraction) from a ``make_knn_counts_fn`` function."""
    correct, counted = counts_fn(features, labels, bank, bank_labels)
    return float(correct) / max(int(counted), 1)


def pixel_features(images: jax.Array) -> jax.Array:
    """Raw-pixel baseline: images in [0, 1], flattened and L2-normalised (as the reference)."""
    flat = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
    return l2_normalize(flat)
