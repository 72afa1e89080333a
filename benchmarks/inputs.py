"""Synthetic inputs fed through the trainer's own view pipeline, shaped as the trainer's.

Small-image datasets (the trainer keeps them resident): a pool of random uint8 images on device
and the trainer's ``ResidentViews`` (the epoch's index table on device, gather + crop + every
augmentation in one jitted call, the step counter kept on device). Large-image datasets
(streamed by the trainer: the host decodes and crops): two uint8 crops per image already on
device and the device half of the pipeline (flip, jitter, grayscale, blur, solarize,
normalisation; with ``dataset.resize_on=device`` first the resize of two windows of random
sizes out of each image's union buffer); the host's JPEG decoding is not part of the number
(``benchmarks.host_input`` times it).

Between epochs the resident pipeline puts the next epoch's index table on the mesh (one explicit
transfer per epoch, as in training); otherwise a step sends nothing from the host.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from moco_jax.data.resident import ResidentTrainSet, ResidentViews, put_sharded
from moco_jax.data.streaming import make_crop_augment_fn
from moco_jax.data.tfds_source import RESIDENT_DATASETS
from moco_jax.mesh import DATA_AXIS, DeviceViews, shard_batch

POOL_STEPS = 32  # synthetic resident epoch: this many batches of distinct random images


class SyntheticViews:
    """``views(step)`` -> the two augmented float views of global step ``step``, made on device."""

    def __init__(self, mesh: Mesh, config: Any, seed: int = 0):
        self.mesh = mesh
        self.batch = config.batch_size
        self.resident = config.dataset.name in RESIDENT_DATASETS
        num_devices = mesh.shape[DATA_AXIS]
        local = len(mesh.local_devices)
        size, channels = config.dataset.image_size, config.dataset.num_channels
        rng = np.random.default_rng(seed)
        if self.resident:
            config = config.copy_and_resolve_references()
            config.seed = seed  # augmentation keys of this instance
            per_device_batch = self.batch // num_devices
            pool = rng.integers(
                0, 256, (POOL_STEPS * per_device_batch * local, size, size, channels), np.uint8
            )
            labels = np.zeros(len(pool), np.int32)
            images, labels, per_device = put_sharded(mesh, pool, labels, pad=False)
            train_set = ResidentTrainSet(mesh, images, labels, per_device, per_device_batch, seed)
            self._views = ResidentViews(train_set, config)
        else:
            rows = self.batch // jax.process_count()
            shape = (rows, size, size, channels)
            crops = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2)]
            # Not host_crops.resizes_on_device: --baseline runs import this with older packages
            if config.dataset.get("resize_on") == "device":  # unions and two boxes in each
                side = config.dataset.union_buffer
                crops[0] = rng.integers(0, 256, (rows, side, side, channels), dtype=np.uint8)
                extent = rng.integers(size // 2, side + 1, (rows, 2, 2))
                crops[1] = np.concatenate([side - extent, extent], axis=2).astype(np.int32)
            self._crops = tuple(shard_batch(mesh, c) for c in crops)
            self._augment = DeviceViews(mesh, make_crop_augment_fn(mesh, config), seed + 1)

    def __call__(self, step: int) -> tuple[jax.Array, jax.Array]:
        if self.resident:
            return self._views(step)
        return self._augment(step, *self._crops)
