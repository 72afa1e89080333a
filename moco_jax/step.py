"""One MoCo v1/v2 training step over a device mesh, in the reference's order.

Per device (inside ``jax.shard_map`` over the ``data`` axis):
  1. momentum update of the key encoder from the online weights, before this step's update;
  2. keys from the (shuffled, for ``shuffle`` BN) key view, L2-normalised, un-shuffled, no grad;
  3. queries and InfoNCE against the positive key and the queue (positive at index 0);
  4. optimizer update with gradients averaged over the global batch;
  5. keys of every device written into the queue at ``queue_ptr`` (wrapping around).

State is replicated in and out; images are sharded along the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moco_jax.losses import info_nce, l2_normalize, moco_logits
from moco_jax.optim import Schedule
from moco_jax.queue import enqueue
from moco_jax.shuffle import shuffle_batch
from moco_jax.state import MoCoState

DATA_AXIS = "data"
BN_MODES = ("shuffle", "sync", "local")

TrainStep = Callable[[MoCoState, jax.Array, jax.Array], tuple[MoCoState, dict[str, jax.Array]]]


def bn_axis_name(bn_mode: str) -> str | None:
    """The mesh axis BN statistics are averaged over: only ``sync`` crosses devices."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of {', '.join(BN_MODES)}")
    return DATA_AXIS if bn_mode == "sync" else None


def _gather_replicated(local: jax.Array, axis_name: str) -> jax.Array:
    """All devices' rows in device order, as a device-invariant value (``psum`` of a scatter)."""
    index = jax.lax.axis_index(axis_name)
    size = jax.lax.axis_size(axis_name)
    rows = local.shape[0]
    full = jnp.zeros((size * rows, *local.shape[1:]), local.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, local, index * rows, axis=0)
    return jax.lax.psum(full, axis_name)


def _tree_distance(a: Any, b: Any) -> jax.Array:
    squares = jax.tree.map(lambda x, y: jnp.sum(jnp.square(x - y)), a, b)
    return jnp.sqrt(sum(jax.tree.leaves(squares)))


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: Schedule,
    mesh: Mesh,
    *,
    momentum: float,
    temperature: float,
    bn_mode: str,
) -> TrainStep:
    """The jitted step ``(state, images_q, images_k) -> (state, metrics)``; donates ``state``.

    ``model`` must have been built with ``bn_axis_name(bn_mode)``. Images are global arrays
    ``[global_batch, H, W, C]`` sharded over the mesh's ``data`` axis (already augmented).
    """
    bn_axis_name(bn_mode)  # validates the mode
    num_devices = mesh.shape[DATA_AXIS]

    def per_device(state: MoCoState, images_q: jax.Array, images_k: jax.Array):
        rng, shuffle_rng = jax.random.split(state.rng)

        # 1. Momentum update of the key encoder (parameters only; BN buffers are its own).
        ema_params = optax.incremental_update(state.params, state.ema_params, 1.0 - momentum)

        # 2. Keys.
        if bn_mode == "shuffle":
            key_input, unshuffle = shuffle_batch(images_k, shuffle_rng, DATA_AXIS, num_devices)
        else:
            key_input, unshuffle = images_k, lambda x: x
        (_, k), key_vars = model.apply(
            {"params": ema_params, "batch_stats": state.ema_batch_stats},
            key_input,
            train=True,
            mutable=["batch_stats"],
        )
        k = jax.lax.stop_gradient(unshuffle(l2_normalize(k)))

        # 3. Queries and InfoNCE against the queue as it was before this step.
        def loss_fn(params):
            (_, q), query_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images_q,
                train=True,
                mutable=["batch_stats"],
            )
            q = l2_normalize(q)
            logits = moco_logits(q, k, state.queue, temperature)
            # pmean of the loss (not of the gradients): grad w.r.t. replicated params sums over
            # devices, so this yields the gradient of the global-batch mean.
            loss = jax.lax.pmean(jnp.mean(info_nce(logits)), DATA_AXIS)
            return loss, (query_vars["batch_stats"], logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )

        # 4. Optimizer update.
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # 5. Enqueue every device's keys, in device order.
        queue, queue_ptr = enqueue(state.queue, state.queue_ptr, _gather_replicated(k, DATA_AXIS))

        # BN running statistics differ per device unless synced: keep their mean.
        def device_mean(tree):
            return jax.tree.map(lambda x: jax.lax.pmean(x, DATA_AXIS), tree)

        if bn_mode != "sync":
            batch_stats = device_mean(batch_stats)
            ema_batch_stats = device_mean(key_vars["batch_stats"])
        else:
            ema_batch_stats = key_vars["batch_stats"]

        logits = logits * temperature  # back to cosine similarities for the metrics
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            ema_params=ema_params,
            ema_batch_stats=ema_batch_stats,
            opt_state=opt_state,
            queue=queue,
            queue_ptr=queue_ptr,
            rng=rng,
        )
        metrics = {
            "loss": loss,
            "top1": jax.lax.pmean(jnp.mean(jnp.argmax(logits, axis=-1) == 0), DATA_AXIS),
            "positive_similarity": jax.lax.pmean(jnp.mean(logits[:, 0]), DATA_AXIS),
            "negative_similarity": jax.lax.pmean(jnp.mean(logits[:, 1:]), DATA_AXIS),
            "ema_distance": _tree_distance(ema_params, params),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "queue_ptr": queue_ptr,
        }
        return new_state, metrics

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=(P(), P()),
    )
    return jax.jit(sharded, donate_argnums=0)
