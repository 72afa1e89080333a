"""The one set-up path: a config becomes a validated mesh, an algorithm and its initial state.

Training, evaluation, the benchmarks and any later tool (linear evaluation, compiling for a TPU
topology) build through here, so every one of them checks the config once, the same way, and
starts from the same state for the same ``config.seed``::

    setup = moco_jax.assemble.build(config, steps_per_epoch)
    state = setup.initial_state()
    state, metrics = setup.algorithm.train_step(state, view_q, view_k)

A run that must place data on the mesh before it knows its epoch length calls ``mesh_for``
first and passes the mesh to ``build``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from moco_jax.algorithms import Algorithm, State, build_algorithm, image_shape
from moco_jax.config.checks import ConfigError
from moco_jax.config.validation import validate
from moco_jax.data.host_crops import resizes_on_device
from moco_jax.data.tfds_source import RESIDENT_DATASETS
from moco_jax.mesh import make_data_mesh, replicated


@dataclasses.dataclass(frozen=True)
class Setup:
    """A validated config, its mesh and its algorithm."""

    config: Any
    mesh: Mesh
    algorithm: Algorithm

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return image_shape(self.config)

    def initial_state(self, seed: int | None = None) -> State:
        """A fresh state from ``config.seed`` (or ``seed``), replicated over the mesh.

        Built inside jit with replicated outputs: every process of a multi-host run computes the
        same state (``device_put`` cannot place arrays on other processes' devices)."""
        rng = jax.random.key(self.config.seed if seed is None else seed)
        init = jax.jit(self.algorithm.init_state, out_shardings=replicated(self.mesh))
        return init(rng)

    def abstract_state(self) -> State:
        """Shapes, dtypes and shardings of the state, without computing it (for compiling)."""
        sharding = replicated(self.mesh)
        shapes = jax.eval_shape(self.algorithm.init_state, jax.random.key(0))
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes
        )


def mesh_for(config: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """Validate ``config`` (every rule that needs no data) and make its ``data`` mesh over
    ``config.num_devices`` of ``devices`` (default: every visible device)."""
    devices = list(jax.devices() if devices is None else devices)
    return make_data_mesh(validate(config, len(devices)), devices)


def build(
    config: Any,
    steps_per_epoch: int,
    mesh: Mesh | None = None,
    devices: Sequence[Any] | None = None,
) -> Setup:
    """Validate ``config`` (unless ``mesh`` comes from ``mesh_for``) and build its algorithm.

    ``steps_per_epoch`` sets the lr schedule's epoch length."""
    mesh = mesh_for(config, devices) if mesh is None else mesh
    setup = Setup(config, mesh, build_algorithm(config, mesh, steps_per_epoch))
    check_memory(setup)
    return setup


def check_memory(setup: Setup) -> None:
    """``ConfigError`` if the state and one step's two views alone (with, when the device
    resizes streamed images, the host's union buffers) exceed a device's memory (a lower bound,
    checked from shapes before anything is allocated or compiled)."""
    config = setup.config
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state()))
    per_device = config.batch_size // setup.mesh.size
    views_bytes = 2 * per_device * int(np.prod(setup.image_shape)) * 4  # float32
    side = config.dataset.get("union_buffer", 0)  # the host's unions, uint8, when resized here
    streamed = config.dataset.name not in RESIDENT_DATASETS
    union_bytes = per_device * side * side * config.dataset.num_channels
    union_bytes = union_bytes if streamed and resizes_on_device(config) else 0
    available = device_memory(setup.mesh.devices.flat[0])
    needed = state_bytes + views_bytes + union_bytes
    if available is not None and needed > available:
        unions = f", {per_device} union buffers of {side}x{side}: {_gib(union_bytes)}"
        raise ConfigError(
            f"the run needs at least {_gib(needed)} per device (state {_gib(state_bytes)}, two "
            f"views of {per_device} images of {'x'.join(map(str, setup.image_shape))}: "
            f"{_gib(views_bytes)}{unions if union_bytes else ''}) but a device has "
            f"{_gib(available)}: lower dataset.image_size, moco.queue_size or batch_size"
            f"{' (or dataset.union_buffer)' if union_bytes else ''}"
        )


def _gib(count: int) -> str:
    return f"{count / 2**30:.3g} GiB"


def device_memory(device) -> int | None:
    """Bytes of memory of ``device``: its allocator's limit, or the host's RAM for a CPU."""
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # not every backend reports memory (e.g. a compile-only topology)
        return None
