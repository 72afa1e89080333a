"""Weighted kNN accuracy on frozen features: the MoCo demo's monitor, on device and batched.

For each test feature: cosine similarity to every memory-bank feature, the ``k`` most similar,
weights ``exp(sim / t)``, per-class sums of weights, prediction = the class with the largest sum
(the official CIFAR demo's ``knn_predict`` with k=200, t=0.1). Features are L2-normalised.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moco_jax.algorithms.info_nce import l2_normalize
from moco_jax.mesh import DATA_AXIS, replicate


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The chunk size used to walk ``n`` rows in equal pieces of at most ``limit``."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def knn_predict(
    features: jax.Array,
    bank: jax.Array,
    bank_labels: jax.Array,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> jax.Array:
    """Predicted labels of ``features [M, D]`` by weighted vote of their ``k`` nearest in ``bank``.

    Bank rows with label -1 (padding) never vote.
    """
    similarity = features @ bank.T
    similarity = jnp.where(bank_labels[None, :] >= 0, similarity, -jnp.inf)
    top_sim, top_index = jax.lax.top_k(similarity, k)
    weights = jnp.exp(top_sim / temperature)
    votes = jax.nn.one_hot(bank_labels[top_index], num_classes) * weights[..., None]
    return jnp.argmax(jnp.sum(votes, axis=1), axis=-1)


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


def make_knn_accuracy_fn(
    mesh: Mesh, num_classes: int, k: int, temperature: float, chunk: int = 256
):
    """Jitted ``(test_feats, test_labels, bank, bank_labels) -> (correct, counted)``.

    Test rows are sharded over devices and walked in chunks; the bank is replicated. Test rows
    with label -1 (padding) are not counted.
    """

    def per_device(features, labels, bank, bank_labels):
        n = features.shape[0]
        size = largest_divisor_at_most(n, chunk)

        def predict(batch):
            return knn_predict(batch, bank, bank_labels, num_classes, k, temperature)

        predictions = jax.lax.map(predict, features.reshape(n // size, size, -1)).reshape(n)
        valid = labels >= 0
        correct = jnp.sum((predictions == labels) & valid)
        return jax.lax.psum(correct, DATA_AXIS), jax.lax.psum(jnp.sum(valid), DATA_AXIS)

    fn = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P()),
            out_specs=(P(), P()),
        )
    )

    def accuracy(features, labels, bank, bank_labels) -> float:
        bank, bank_labels = replicate(mesh, (bank, bank_labels))
        correct, counted = fn(features, labels, bank, bank_labels)
        return float(correct) / max(int(counted), 1)

    return accuracy


def pixel_features(images: jax.Array) -> jax.Array:
    """Raw-pixel baseline: images in [0, 1], flattened and L2-normalised (as the reference)."""
    flat = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
    return l2_normalize(flat)
