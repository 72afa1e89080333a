"""kNN monitor during and after pretraining: frozen features of the train split as memory bank,
test split evaluated; plus the raw-pixel and random-init baselines for the same data."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from moco_jax.data.resident import make_eval_transform, put_sharded
from moco_jax.knn import make_feature_fn, make_knn_accuracy_fn, pixel_features


@dataclasses.dataclass
class KnnMonitor:
    """Evaluates encoder variables with weighted kNN; everything stays on device."""

    mesh: Mesh
    model: nn.Module
    config: Any
    bank_images: jax.Array
    bank_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array
    num_classes: int

    def __post_init__(self):
        self._features = make_feature_fn(self.mesh, self.model, make_eval_transform(self.config))
        knn = self.config.knn
        self._accuracy = make_knn_accuracy_fn(self.mesh, self.num_classes, knn.k, knn.temperature)

    @classmethod
    def create(cls, mesh, model, config, bank_images, bank_labels, test_images_np, test_labels_np):
        """``bank_*``: the resident training set; ``test_*_np``: this process's test examples."""
        test_images, test_labels, _ = put_sharded(mesh, test_images_np, test_labels_np, pad=True)
        num_classes = int(max(np.max(test_labels_np), int(jax.device_get(bank_labels).max()))) + 1
        return cls(
            mesh, model, config, bank_images, bank_labels, test_images, test_labels, num_classes
        )

    def evaluate(self, variables: dict) -> dict[str, float]:
        """Top-1 (%) of kNN on the head (128-d output) and backbone (pooled) features."""
        bank_head, bank_backbone = self._features(variables, self.bank_images)
        test_head, test_backbone = self._features(variables, self.test_images)
        return {
            "knn_head": 100
            * self._accuracy(test_head, self.test_labels, bank_head, self.bank_labels),
            "knn_backbone": 100
            * self._accuracy(test_backbone, self.test_labels, bank_backbone, self.bank_labels),
        }

    def pixel_baseline(self) -> float:
        """Top-1 (%) of the same kNN on L2-normalised raw pixels."""
        features = jax.jit(pixel_features)
        return 100 * self._accuracy(
            features(self.test_images),
            self.test_labels,
            features(self.bank_images),
            self.bank_labels,
        )
