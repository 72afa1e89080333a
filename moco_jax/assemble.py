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
    """``ConfigError`` if the state and one step's two views alone exceed a device's memory (a
    lower bound, checked from shapes before anything is allocated or compiled)."""
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state()))
    per_device = setup.config.batch_size // setup.mesh.size
    views_bytes = 2 * per_device * int(np.prod(setup.image_shape)) * 4  # float32
    available = device_memory(setup.mesh.devices.flat[0])
    needed = state_bytes + views_bytes
    if available is not None and needed > available:
        gib = lambda n: f"{n / 2**30:.3g} GiB"
        raise ConfigError(
            f"the run needs at least {gib(needed)} per device (state {gib(state_bytes)}, two "
            f"views of {per_device} images of {'x'.join(map(str, setup.image_shape))}: "
            f"{gib(views_bytes)}) but a device has {gib(available)}: lower "
            f"dataset.image_size, moco.queue_size or batch_size"
        )


def device_memory(device) -> int | None:
    """Bytes of memory of ``device``: its allocator's limit, or the host's RAM for a CPU."""
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # not every backend reports memory (e.g. a compile-only topology)
        return None
