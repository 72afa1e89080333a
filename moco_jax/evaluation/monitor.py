"""kNN monitor during and after pretraining: frozen features of the train split as memory bank,
test split evaluated; plus the raw-pixel and random-init baselines for the same data.

Images reach it as a *source*: a callable returning an iterable of ``(uint8 images, labels)``
batches already on the mesh (rows sharded over ``data``; label -1 marks padding). A resident
dataset is one batch; a streamed one (ImageNet) is many.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from moco_jax.data.resident import make_eval_transform
from moco_jax.evaluation.knn import accuracy_of, make_feature_fn, make_knn_counts_fn, pixel_features

Source = Callable[[], Iterable[tuple[jax.Array, jax.Array]]]

# Raw-pixel features of images larger than this are downsampled to it (ImageNet's 150k-d pixel
# vectors for 1.28M images would not fit anywhere).
MAX_PIXEL_SIZE = 32


def collect(source: Source, featurize) -> tuple[list[jax.Array], jax.Array]:
    """Each column of ``featurize(images)`` (a tuple) and the labels of all of ``source``'s
    batches, in batch order.

    Concatenating batches sharded over ``data`` gives rows sharded over ``data`` again
    (moved between devices by an all-to-all, never gathered): the kNN bank stays split over
    the devices, and its ties go to the earlier row of this concatenation."""
    outputs, labels = [], []
    for images, batch_labels in source():
        outputs.append(featurize(images))
        labels.append(batch_labels)
    columns = [jnp.concatenate(column) for column in zip(*outputs, strict=True)]
    return columns, jnp.concatenate(labels)


@dataclasses.dataclass
class KnnMonitor:
    """Evaluates encoder variables with weighted kNN; features stay on device, the memory bank
    split over the devices (1/n of its rows each)."""

    mesh: Mesh
    model: nn.Module
    config: Any
    bank_source: Source
    test_source: Source
    num_classes: int

    def __post_init__(self):
        # The jitted functions (also compiled without running by ``moco_jax.pod.compile_for``).
        transform = make_eval_transform(self.config)
        self.features_fn = make_feature_fn(self.mesh, self.model, transform)
        knn = self.config.knn
        self.counts_fn = make_knn_counts_fn(self.mesh, self.num_classes, knn.k, knn.temperature)
        self.pixels_fn = jax.jit(small_pixel_features)

    def _top1(self, featurize) -> list[float]:
        bank, bank_labels = collect(self.bank_source, featurize)
        test, test_labels = collect(self.test_source, featurize)
        return [
            100 * accuracy_of(self.counts_fn, t, test_labels, b, bank_labels)
            for t, b in zip(test, bank, strict=True)
        ]

    def evaluate(self, variables: dict) -> dict[str, float]:
        """Top-1 (%) of kNN on the head (``dim``-d output) and backbone (pooled) features."""
        head, backbone = self._top1(lambda images: self.features_fn(variables, images))
        return {"knn_head": head, "knn_backbone": backbone}

    def baselines(
        self, initial_variables: dict, loaded_variables: dict | None = None
    ) -> dict[str, float]:
        """What pretraining has to beat: raw pixels, the randomly initialised encoder and, for a
        run started from another run's weights (``init_from``), those weights before training."""
        result = {"knn_pixels": self.pixel_baseline()}
        initial = self.evaluate(initial_variables)
        result.update({f"random_init_{k}": v for k, v in initial.items()})
        if loaded_variables is not None:
            loaded = self.evaluate(loaded_variables)
            result.update({f"init_from_{k}": v for k, v in loaded.items()})
        return result

    def pixel_baseline(self) -> float:
        """Top-1 (%) of the same kNN on L2-normalised raw pixels in [0, 1]."""
        (top1,) = self._top1(lambda images: (self.pixels_fn(images),))
        return top1


def small_pixel_features(images: jax.Array) -> jax.Array:
    size = images.shape[1]
    if size > MAX_PIXEL_SIZE:
        shape = (images.shape[0], MAX_PIXEL_SIZE, MAX_PIXEL_SIZE, images.shape[-1])
        images = jax.image.resize(images.astype(jnp.float32), shape, "linear")
    return pixel_features(images)
