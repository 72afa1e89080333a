"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020): query encoder, momentum key encoder, queue.

One training step, per device (inside ``jax.shard_map`` over the ``data`` axis), in the
reference's order:
  1. momentum update of the key encoder from the online weights, before this step's update;
  2. keys from the (shuffled, for ``shuffle`` BN) key view, L2-normalised, un-shuffled, no grad;
  3. queries and InfoNCE against the positive key and the queue (positive at index 0);
  4. optimizer update with gradients averaged over the global batch;
  5. keys of every device written into the queue at ``queue_ptr`` (wrapping around).

v1 and v2 differ only in config (head, temperature, augmentation, lr schedule). State is
replicated in and out; images are sharded along the batch.

``symmetric`` (``moco.symmetric``) is the official CIFAR-10 colab's symmetric loss
(facebookresearch/moco ``colab/moco_cifar10_demo.ipynb``, ``ModelMoCo.forward``): after the
momentum update, ``ctr(q1, k2) + ctr(q2, k1)``, both against the queue as it was before the
step, and the keys of both views enqueued (``[k1; k2]`` of the global batch: 2N per step). The
query encoder sees view 1, then view 2; the key encoder view 2, then view 1 (each with its own
Shuffle-BN permutation), as in the colab's two ``contrastive_loss`` calls.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from moco_jax.algorithms import Algorithm, image_shape, register_algorithm
from moco_jax.algorithms.data_parallel import device_mean, jit_step, mean_value_and_grad
from moco_jax.algorithms.info_nce import info_nce, l2_normalize, moco_logits
from moco_jax.algorithms.momentum import momentum_update
from moco_jax.algorithms.queue import enqueue, init_queue
from moco_jax.algorithms.shuffle_bn import shuffle_batch
from moco_jax.algorithms.step_metrics import contrastive_metrics
from moco_jax.config.batch_rules import key_bn_group_size, shuffle_group
from moco_jax.mesh import DATA_AXIS, gather_replicated
from moco_jax.models import bn_axis_name, build_encoder
from moco_jax.optim import make_lr_schedule, make_optimizer


@flax.struct.dataclass
class MoCoState:
    """Online (query) and EMA (key) encoders, optimizer state, queue, and RNG.

    Attributes:
      step: number of optimizer steps taken.
      params / batch_stats: the query encoder (trained by gradient).
      ema_params / ema_batch_stats: the key encoder; params follow the momentum update, BN running
        statistics come from its own forward passes (as in the reference).
      opt_state: optax state of the query encoder's optimizer.
      queue: ``[K, D]`` L2-normalised keys of earlier steps (negatives).
      queue_ptr: int32 index where the next keys are written.
      rng: PRNG key for this run's randomness inside the step (key shuffling).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    ema_params: Any
    ema_batch_stats: Any
    opt_state: optax.OptState
    queue: jax.Array
    queue_ptr: jax.Array
    rng: jax.Array

    def encoder_variables(self) -> dict[str, Any]:
        """Flax variables of the query encoder (what evaluation and transfer use)."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def parts(self) -> dict[str, Any]:
        """The key encoder and the queue (``Algorithm.parts``: the official checkpoint's)."""
        key_encoder = {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        return {"momentum_encoder": key_encoder, "queue": self.queue, "queue_ptr": self.queue_ptr}


def create_state(rng, model, optimizer, image_shape, queue_size: int) -> MoCoState:
    """Fresh state: the key encoder starts as an exact copy of the query encoder."""
    init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
    dummy = jnp.zeros((2, *image_shape), jnp.float32)
    # train=False: no batch statistics, so BN synced over a mesh axis initialises outside shard_map.
    variables = model.init(init_rng, dummy, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    _, embedding = jax.eval_shape(lambda: model.apply(variables, dummy, train=False))
    return MoCoState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        ema_params=jax.tree.map(jnp.copy, params),
        ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        opt_state=optimizer.init(params),
        queue=init_queue(queue_rng, queue_size, embedding.shape[-1]),
        queue_ptr=jnp.zeros((), jnp.int32),
        rng=state_rng,
    )


def load_encoder(state: MoCoState, variables: dict[str, Any]) -> MoCoState:
    """``state`` with ``variables`` in both encoders (the key encoder starts as a copy)."""
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return state.replace(
        params=params,
        batch_stats=batch_stats,
        ema_params=copy(params),
        ema_batch_stats=copy(batch_stats),
    )


def make_train_step(
    model, optimizer, schedule, mesh: Mesh, *, momentum, temperature, bn_mode, ordered=False,
    symmetric=False, shuffle_group=None,
):  # fmt: skip
    """The jitted step ``(state, images_q, images_k) -> (state, metrics)``; donates ``state``.

    ``model`` must have been built with ``bn_axis_name(bn_mode)``. Images are global arrays
    ``[global_batch, H, W, C]`` sharded over the mesh's ``data`` axis (already augmented).
    ``ordered``: means over devices (gradients, loss, BN statistics, metrics) add in device
    order (``mesh.ordered_sum``): the same bits for any split of the devices into processes.
    ``shuffle_group``: devices per Shuffle-BN group (default: all of them).
    """
    num_devices = mesh.shape[DATA_AXIS]
    mean = device_mean(mesh, ordered)

    def per_device(state: MoCoState, images_q: jax.Array, images_k: jax.Array):
        rng, shuffle_rng = jax.random.split(state.rng)
        # 1. Momentum update of the key encoder (parameters only; BN buffers are its own).
        ema_params = momentum_update(state.params, state.ema_params, momentum)

        # 2. Keys, from a batch shuffled across devices (Shuffle-BN) or as it is.
        def keys(images, rng, stats):
            if bn_mode == "shuffle":
                key_input, unshuffle = shuffle_batch(
                    images, rng, DATA_AXIS, num_devices, shuffle_group
                )
            else:
                key_input, unshuffle = images, lambda x: x
            key_vars = {"params": ema_params, "batch_stats": stats}
            (_, k), key_vars = model.apply(key_vars, key_input, train=True, mutable="batch_stats")
            return jax.lax.stop_gradient(unshuffle(l2_normalize(k))), key_vars["batch_stats"]

        if symmetric:  # k2, then k1, each with its own shuffle
            rng_2, rng_1 = jax.random.split(shuffle_rng)
            k2, ema_batch_stats = keys(images_k, rng_2, state.ema_batch_stats)
            k1, ema_batch_stats = keys(images_q, rng_1, ema_batch_stats)
            pairs, new_keys = [(images_q, k2), (images_k, k1)], [k1, k2]
        else:
            k, ema_batch_stats = keys(images_k, shuffle_rng, state.ema_batch_stats)
            pairs, new_keys = [(images_q, k)], [k]

        # 3. Queries and InfoNCE against the queue as it was before this step.
        def loss_fn(params):
            batch_stats, losses, logits = state.batch_stats, [], []
            for images, k in pairs:
                variables = {"params": params, "batch_stats": batch_stats}
                (_, q), variables = model.apply(
                    variables, images, train=True, mutable="batch_stats"
                )
                batch_stats = variables["batch_stats"]
                logits.append(moco_logits(l2_normalize(q), k, state.queue, temperature))
                losses.append(jnp.mean(info_nce(logits[-1])))
            return sum(losses[1:], losses[0]), (batch_stats, jnp.concatenate(logits))

        (loss, (batch_stats, logits)), grads = mean_value_and_grad(loss_fn, state.params, mean)

        # 4. Optimizer update.
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # 5. Enqueue every device's keys, in device order (symmetric: all k1, then all k2).
        gathered = [gather_replicated(k, DATA_AXIS) for k in new_keys]
        queue, queue_ptr = enqueue(state.queue, state.queue_ptr, jnp.concatenate(gathered))

        # BN running statistics differ per device unless synced: keep their mean.
        if bn_mode != "sync":
            batch_stats, ema_batch_stats = mean(batch_stats), mean(ema_batch_stats)
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
        metrics = contrastive_metrics(loss, logits * temperature, ema_params, params, mean)
        metrics["queue_ptr"] = queue_ptr
        metrics["learning_rate"] = jnp.float32(schedule(state.step))
        return new_state, metrics

    return jit_step(per_device, mesh)


@register_algorithm("moco")
def build(config: Any, mesh: Mesh, steps_per_epoch: int) -> Algorithm:
    """MoCo v1/v2 from a validated config: encoder, SGD, per-epoch lr schedule, the step."""
    num_devices = mesh.shape[DATA_AXIS]
    group = shuffle_group(config.model, num_devices)
    model_config = config.model.copy_and_resolve_references()
    per_device = config.batch_size // num_devices
    model_config.bn_group_size = key_bn_group_size(config.model, per_device, num_devices)
    model = build_encoder(model_config, bn_axis_name(config.model.bn_mode))
    schedule = make_lr_schedule(config.optim, config.batch_size, steps_per_epoch, config.epochs)
    optimizer = make_optimizer(config.optim, schedule)
    step = make_train_step(
        model,
        optimizer,
        schedule,
        mesh,
        momentum=config.moco.momentum,
        temperature=config.moco.temperature,
        bn_mode=config.model.bn_mode,
        shuffle_group=group,
        ordered=config.ordered_reductions,
        symmetric=config.moco.symmetric,
    )
    return Algorithm(
        name="moco",
        model=model,
        schedule=schedule,
        init_state=lambda rng: create_state(
            rng, model, optimizer, image_shape(config), config.moco.queue_size
        ),
        train_step=step,
        encoder_variables=MoCoState.encoder_variables,
        load_encoder=load_encoder,
        parts=MoCoState.parts,
    )
