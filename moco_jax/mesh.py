"""The device mesh and putting host batches on it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moco_jax.step import DATA_AXIS


def make_data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all by default) named ``data``."""
    available = jax.device_count()
    num_devices = num_devices or available
    if num_devices > available:
        raise ValueError(f"asked for {num_devices} devices but only {available} are visible")
    return jax.make_mesh(
        (num_devices,),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Explicit,),
        devices=jax.devices()[:num_devices],
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch split along its first axis over the ``data`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(mesh: Mesh, local_batch: np.ndarray) -> jax.Array:
    """This process's rows of the global batch -> one global ``jax.Array`` on the mesh."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


def shard_views(mesh: Mesh, per_device):
    """Jit ``per_device(a, b, rng) -> (view_q, view_k)`` over the mesh: ``a``, ``b`` and the views
    split along the batch, ``rng`` replicated and folded with the device index first."""

    def body(a, b, rng):
        return per_device(a, b, jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS)))

    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(DATA_AXIS), P(DATA_AXIS), P()),
            out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
        )
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value held whole by every device of ``mesh``."""
    return NamedSharding(mesh, P())


def replicate(mesh: Mesh, tree):
    """A pytree of jax arrays made whole on every device (works across processes: a jitted
    identity with replicated output, not ``device_put``, which needs addressable devices)."""
    return jax.jit(lambda x: x, out_shardings=replicated(mesh))(tree)
