"""Data parallelism shared by every algorithm's step: the state replicated, the batch split over
the mesh's ``data`` axis, the gradient of the global-batch mean averaged over devices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moco_jax.mesh import DATA_AXIS


def mean_value_and_grad(
    loss_fn: Callable, params: Any, device_mean: Callable | None = None
) -> tuple[tuple[Any, Any], Any]:
    """Inside ``shard_map``: ``((loss, aux), grads)`` of ``loss_fn`` (this device's mean loss,
    with ``has_aux``), loss and gradients averaged over devices by ``device_mean`` (default
    ``pmean``) in the params' dtype, float32.

    Each device differentiates w.r.t. params made device-varying. Differentiating the replicated
    params directly would sum the cotangents where they meet the batch: after a bfloat16 model's
    cast, i.e. an all-reduce in bfloat16."""
    mean = device_mean or (lambda tree: jax.lax.pmean(tree, DATA_AXIS))
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
