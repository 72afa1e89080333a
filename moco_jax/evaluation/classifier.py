"""The linear-classification protocol's measure: top-1 and top-5 of the classifier on the test
split (``ClassifierMonitor``), on the encoder's features of each test image, unaugmented.

The run that trains the classifier (``python -m moco_jax.evaluate linear``) is
``moco_jax.run.linear_eval``; it hands this monitor the test split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moco_jax.algorithms.linear import classify
from moco_jax.assemble import Setup
from moco_jax.data.resident import make_eval_transform
from moco_jax.evaluation.knn import largest_divisor_at_most, make_feature_fn
from moco_jax.evaluation.monitor import collect
from moco_jax.mesh import DATA_AXIS


@dataclasses.dataclass
class ClassifierMonitor:
    """Top-1 and top-5 (%) of the linear classifier on the test split (labels -1: padding); the
    state is read through the algorithm's record (``encoder_variables``, ``parts``)."""

    setup: Setup
    test_source: Any  # () -> batches of (images, labels) on the mesh
    cached_test: tuple[jax.Array, jax.Array] | None = None  # (features, labels) when cached

    def __post_init__(self):
        # The jitted functions (also compiled without running by ``moco_jax.pod.compile_for``).
        mesh, model = self.setup.mesh, self.setup.algorithm.model
        transform = make_eval_transform(self.setup.config)
        self.features_fn = make_feature_fn(mesh, model, transform, normalize=False)
        self.counts_fn = _make_count_fn(mesh)

    def features(self, state, images) -> jax.Array:
        """Backbone features (not normalised) of ``images`` under ``state``'s encoder."""
        return self.features_fn(self.setup.algorithm.encoder_variables(state), images)[1]

    def features_of(self, state, source) -> tuple[jax.Array, jax.Array]:
        """Features (no augmentation) and labels of every batch of ``source``, on the mesh."""
        (features,), labels = collect(source, lambda images: (self.features(state, images),))
        return features, labels

    def evaluate(self, state) -> dict[str, float]:
        if self.cached_test is not None:
            batches = [self.cached_test]
        else:
            batches = ((self.features(state, x), y) for x, y in self.test_source())
        classifier = self.setup.algorithm.parts(state)["classifier"]
        totals = np.zeros(3, np.int64)
        for features, labels in batches:
            totals += np.asarray(self.counts_fn(classifier, features, labels))
        top1, top5, counted = totals
        return {
            "test_top1": 100 * top1 / max(counted, 1),
            "test_top5": 100 * top5 / max(counted, 1),
        }


def _make_count_fn(mesh, chunk: int = 1024):
    """Jitted ``(classifier, features, labels) -> [top-1 hits, top-5 hits, counted]``."""

    def per_device(classifier, features, labels):
        n = features.shape[0]
        size = largest_divisor_at_most(n, chunk)

        def hits(batch):
            feats, labs = batch
            logits = classify(classifier, feats)
            top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
            return top[:, 0] == labs, jnp.any(top == labs[:, None], axis=-1)

        chunks = (features.reshape(n // size, size, -1), labels.reshape(n // size, size))
        top1, top5 = (x.reshape(n) for x in jax.lax.map(hits, chunks))
        valid = labels >= 0
        counts = jnp.stack([jnp.sum(top1 & valid), jnp.sum(top5 & valid), jnp.sum(valid)])
        return jax.lax.psum(counts, DATA_AXIS)

    return jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)), out_specs=P()
        )
    )
