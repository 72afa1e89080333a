"""Synthetic inputs that stay on the devices, shaped as the trainer's.

Small-image datasets (the trainer keeps them resident): uint8 images on device, per-step index
arrays and RNG keys, and the trainer's own ``make_view_fn`` (gather + crop + every augmentation
on device). Large-image datasets (streamed by the trainer: the host decodes and crops): two
uint8 crops per image already on device and the device half of the pipeline (flip, jitter,
grayscale, blur, solarize, normalisation); the host's JPEG decoding is not part of the number.

Everything a step needs is put on the devices before timing starts (``args(step)``), so the
timed loop only dispatches device work.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from moco_jax.data.resident import make_view_fn, put_sharded
from moco_jax.data.streaming import make_crop_augment_fn
from moco_jax.data.tfds_source import RESIDENT_DATASETS
from moco_jax.mesh import replicate, shard_batch
from moco_jax.step import DATA_AXIS


class SyntheticViews:
    """``views(args(step))`` -> the two augmented float views of a step, made on device."""

    def __init__(self, mesh: Mesh, config: Any, seed: int = 0):
        self.mesh = mesh
        self.batch = config.batch_size
        self.resident = config.dataset.name in RESIDENT_DATASETS
        num_devices = mesh.shape[DATA_AXIS]
        size, channels = config.dataset.image_size, config.dataset.num_channels
        rng = np.random.default_rng(seed)
        if self.resident:
            pool = rng.integers(0, 256, (2 * self.batch, size, size, channels), dtype=np.uint8)
            labels = np.zeros(len(pool), np.int32)
            self.images, _, self.per_device = put_sharded(self.mesh, pool, labels, pad=False)
            self.per_device_batch = self.batch // num_devices
            self._fn = make_view_fn(mesh, config)
        else:
            shape = (self.batch, size, size, channels)
            self.crops = tuple(
                shard_batch(mesh, rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(2)
            )
            self._fn = make_crop_augment_fn(mesh, config)

    def args(self, step: int, seed: int = 0) -> tuple[jax.Array, ...]:
        """Device arrays that select and randomise step ``step`` (host work happens here)."""
        # Replicated over the mesh here: a key on one device would be copied to the others
        # inside the loop (a device-to-device transfer that transfer_guard rightly refuses).
        key = replicate(self.mesh, jax.random.fold_in(jax.random.key(seed), step))
        if not self.resident:
            return (key,)
        rng = np.random.default_rng([seed, step])
        local = len(self.mesh.local_devices)
        indices = np.concatenate(
            [rng.permutation(self.per_device)[: self.per_device_batch] for _ in range(local)]
        ).astype(np.int32)
        return (shard_batch(self.mesh, indices), key)

    def __call__(self, args: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        if self.resident:
            return self._fn(self.images, *args)
        return self._fn(*self.crops, *args)

    @property
    def fn(self):
        """The jitted view function (for ``.lower(...).compile()`` timing)."""
        return self._fn

    def fn_args(self, args: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return (self.images, *args) if self.resident else (*self.crops, *args)
