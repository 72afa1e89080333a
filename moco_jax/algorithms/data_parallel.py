"""Data parallelism shared by every algorithm's step: the state replicated, the batch split over
the mesh's ``data`` axis, the gradient of the global-batch mean averaged over devices, every mean
over devices taken one way (``device_mean``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moco_jax.mesh import DATA_AXIS, ordered_sum

DeviceMean = Callable[[Any], Any]  # inside shard_map: tree -> its mean over the devices


def device_mean(mesh: Mesh, ordered: bool = False) -> DeviceMean:
    """The mean over the mesh's ``data`` axis of every device's tree (gradients, loss, BN
    statistics, metrics): ``pmean``, or with ``ordered`` (``config.ordered_reductions``) sums
    added in device order (``mesh.ordered_sum``): the same bits for any split of the devices
    into processes."""
    if not ordered:
        return lambda tree: jax.lax.pmean(tree, DATA_AXIS)
    num_devices = mesh.shape[DATA_AXIS]
    return lambda tree: jax.tree.map(lambda x: x / num_devices, ordered_sum(tree, DATA_AXIS))


def mean_value_and_grad(
    loss_fn: Callable, params: Any, mean: DeviceMean
) -> tuple[tuple[Any, Any], Any]:
    """Inside ``shard_map``: ``((loss, aux), grads)`` of ``loss_fn`` (this device's mean loss,
    with ``has_aux``), loss and gradients averaged over devices by ``mean`` (``device_mean``)
    in the params' dtype, float32.

    Each device differentiates w.r.t. params made device-varying. Differentiating the replicated
    params directly would sum the cotangents where they meet the batch: after a bfloat16 model's
    cast, i.e. an all-reduce in bfloat16."""
    varying = jax.lax.pcast(params, DATA_AXIS, to="varying")
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(varying)
    loss, grads = mean((loss, grads))
    return (loss, aux), grads


def jit_step(per_device: Callable, mesh: Mesh):
    """``per_device(state, a, b) -> (state, metrics)`` as the jitted step over ``mesh``: state
    and metrics replicated, ``a`` and ``b`` split over ``data``; donates the state."""
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)), out_specs=(P(), P())
    )
    return jax.jit(sharded, donate_argnums=0)
