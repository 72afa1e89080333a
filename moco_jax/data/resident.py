"""Small datasets kept on the accelerators as uint8; the host only draws each epoch's order.

The training images are split evenly over the mesh's devices (each process holds the devices it
owns). Each epoch every device walks a fresh permutation of its own examples, so every example is
used once per epoch across all devices and processes; the last partial batch is dropped (as the
reference's ``drop_last=True``). The sampler is a pure function of ``(seed, epoch, device)``, so a
resumed run sees exactly the batches an uninterrupted one would. The epoch's index table goes to
the devices once per epoch; each step's row is picked on device (no per-step host transfer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moco_jax.data.augment import augment_batch, normalize_only, two_views
from moco_jax.mesh import DATA_AXIS, DeviceViews, put_process_local, shard_batch, shard_views

# The epoch's index table: one row per step, its columns split over the devices like the batch.
EPOCH_TABLE_SPEC = P(None, DATA_AXIS)


def _local_device_indices(mesh: Mesh) -> list[int]:
    """Positions along the data axis of this process's devices, in mesh order."""
    devices = list(mesh.devices.flat)
    return [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]


def put_sharded(mesh: Mesh, images: np.ndarray, labels: np.ndarray, pad: bool):
    """Split this process's examples evenly over its devices and place them on the mesh.

    With ``pad`` the remainder is padded (label -1, to be ignored) instead of dropped.
    Returns ``(images, labels, per_device_count)``.
    """
    local_devices = len(_local_device_indices(mesh))
    count = len(images)
    per_device = -(-count // local_devices) if pad else count // local_devices
    if per_device == 0:
        raise ValueError(f"{count} examples cannot be spread over {local_devices} devices")
    total = per_device * local_devices
    if pad and total > count:
        images = np.concatenate([images, np.zeros((total - count, *images.shape[1:]), np.uint8)])
        labels = np.concatenate([labels, np.full(total - count, -1, np.int32)])
    return (
        shard_batch(mesh, images[:total]),
        shard_batch(mesh, labels[:total]),
        per_device,
    )


@dataclasses.dataclass
class ResidentTrainSet:
    """Training images on device and the host-side sampler of per-device indices."""

    mesh: Mesh
    images: jax.Array  # [num_devices * per_device, H, W, C] uint8, sharded over ``data``
    labels: jax.Array
    per_device: int
    per_device_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.per_device // self.per_device_batch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """``[steps, local_devices * per_device_batch]`` device-local indices for ``epoch``."""
        rows = []
        for device in _local_device_indices(self.mesh):
            rng = np.random.default_rng([self.seed, epoch, device])
            perm = rng.permutation(self.per_device)[: self.steps_per_epoch * self.per_device_batch]
            rows.append(perm.reshape(self.steps_per_epoch, self.per_device_batch))
        return np.concatenate(rows, axis=1).astype(np.int32)

    def device_epoch_indices(self, epoch: int) -> jax.Array:
        """``epoch_indices(epoch)`` on the mesh, once per epoch: ``[steps, global batch]`` int32
        with the columns of each device on that device (the view function picks the row)."""
        sharding = NamedSharding(self.mesh, EPOCH_TABLE_SPEC)
        return put_process_local(sharding, self.epoch_indices(epoch))


def make_view_fn(mesh: Mesh, config: Any, steps_per_epoch: int, inputs: str = "two_views"):
    """Jitted ``(data, epoch_table, rng, step) -> (a, b, step + 1)``: picks the step's row of the
    epoch's index table and gathers it on device (see ``shard_views``). ``inputs`` says what
    ``data`` and ``(a, b)`` are (``Algorithm.inputs``):

    - ``two_views``: uint8 images -> the query and key views, augmented;
    - ``labelled_view``: (uint8 images, labels) -> one augmented view (query-view settings), labels;
    - ``features``: (features, labels) -> the rows as they are (cached features, no augmentation).
    """
    size = config.dataset.image_size
    mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
    aug = config.augment

    def per_device(data, epoch_table, step, rng):
        indices = jax.lax.dynamic_index_in_dim(
            epoch_table, step % steps_per_epoch, axis=0, keepdims=False
        )
        if inputs == "two_views":
            return two_views(rng, data[indices], aug, size, mean, std)
        images, labels = data
        if inputs == "labelled_view":
            return augment_batch(rng, images[indices], aug, 0, size, mean, std), labels[indices]
        return images[indices], labels[indices]

    return shard_views(mesh, per_device, EPOCH_TABLE_SPEC)


class ResidentViews:
    """``views(step)``: the two augmented views of global step ``step``, made on device (or, for
    another ``inputs``, one view and its labels, or cached features and labels).

    A pure function of ``(seed, step)``: resuming at any step continues the same data order.
    """

    def __init__(self, train_set: ResidentTrainSet, config: Any, inputs: str = "two_views"):
        self.train_set, self.inputs = train_set, inputs
        self.steps_per_epoch = train_set.steps_per_epoch
        view_fn = make_view_fn(train_set.mesh, config, self.steps_per_epoch, inputs)
        self._views = DeviceViews(train_set.mesh, view_fn, config.seed + 1)
        self._epoch, self._epoch_table = None, None

    def checkpoint_extra(self) -> dict:
        """Nothing beyond the step: the data order is a function of it."""
        return {}

    def restore(self, extra: dict) -> None:
        del extra  # nothing to take back (see checkpoint_extra)

    def counters(self) -> dict[str, int]:
        """No input counters: every example is on device, none is skipped."""
        return {}

    def check_resumable(self, extra: dict) -> None:
        del extra  # the dataset name and size are checked with the config and epoch length

    def __call__(self, step: int) -> tuple[jax.Array, jax.Array]:
        """Host work only at an epoch's first step (its index table); otherwise pure dispatch."""
        epoch = step // self.steps_per_epoch
        if epoch != self._epoch:
            self._epoch, self._epoch_table = epoch, self.train_set.device_epoch_indices(epoch)
        data = self.train_set.images
        if self.inputs != "two_views":
            data = (data, self.train_set.labels)
        return self._views(step, data, self._epoch_table)


def make_eval_transform(config: Any):
    """uint8 -> normalised float, the evaluation transform (no augmentation)."""
    mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
    return lambda images: normalize_only(images, mean, std)
