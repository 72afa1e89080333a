"""MoCo v3 (Chen, Xie, He, ICCV 2021; facebookresearch/moco-v3 ``moco/builder.py`` and
``main_moco.py``): no queue, a predictor, a symmetric loss, a momentum schedule.

The base encoder is backbone + projector (``model.head`` ``v3_resnet`` / ``v3_vit``); the
online side adds a predictor; the momentum encoder is an EMA copy of backbone + projector
(parameters only; its BN statistics come from its own forward passes). One step, per device
(inside ``jax.shard_map`` over the ``data`` axis), in the official ``forward``'s order:
  1. queries ``q1 = predictor(base(x1))`` and ``q2 = predictor(base(x2))``: two forward passes,
     so every BN normalises each view with its own statistics and the running statistics are
     updated with view 1's, then view 2's;
  2. momentum update of the momentum encoder with m of this step (``moco.momentum``, or its
     half-cycle cosine to 1 with ``moco.momentum_cosine``), then keys ``k1``, ``k2`` from the
     updated momentum encoder (no gradient), in that order;
  3. loss ``ctr(q1, k2) + ctr(q2, k1)`` (``contrastive.py``: keys all-gathered, positive of
     row i on device r at ``i + N * r``, cross-entropy times ``2 T``);
  4. optimizer step (``optim.name``: LARS, AdamW or SGD) on backbone + projector + predictor
     with the gradient of the global-batch mean.

BatchNorm is synchronised over every device in the whole model with ``model.bn_mode=sync``
(the official converts every BN to SyncBN); ``local`` keeps per-device statistics. The
``data`` axis holds the batch; the state is replicated.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from moco_jax.algorithms import Algorithm, image_shape, register_algorithm
from moco_jax.algorithms.contrastive import contrastive_loss, gathered_keys
from moco_jax.algorithms.data_parallel import device_mean, jit_step, mean_value_and_grad
from moco_jax.algorithms.momentum import momentum_update
from moco_jax.algorithms.momentum_schedule import momentum_schedule
from moco_jax.algorithms.step_metrics import contrastive_metrics
from moco_jax.mesh import DATA_AXIS
from moco_jax.models import bn_axis_name, build_encoder
from moco_jax.models.encoder import build_predictor
from moco_jax.optim import make_lr_schedule, make_optimizer

ENCODER_PARTS = ("backbone", "head")  # the base / momentum encoder: backbone + projector


def encoder_part(tree: dict[str, Any]) -> dict[str, Any]:
    """The backbone and projector of a ``{backbone, head, predictor}`` tree."""
    return {part: tree[part] for part in ENCODER_PARTS if part in tree}


@flax.struct.dataclass
class MoCoV3State:
    """Online network, momentum encoder and optimizer state.

    Attributes:
      step: number of optimizer steps taken (the lr and m schedules' position).
      params / batch_stats: the online network, ``{"backbone", "head", "predictor"}`` (the
        projector is ``head``, as in the v1/v2 encoder; a backbone without BatchNorm has no
        ``batch_stats`` entry).
      ema_params / ema_batch_stats: the momentum encoder, ``{"backbone", "head"}``.
      opt_state: optax state of the online network's optimizer.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    ema_params: Any
    ema_batch_stats: Any
    opt_state: optax.OptState

    def encoder_variables(self) -> dict[str, Any]:
        """Flax variables of the base encoder (what evaluation and transfer use)."""
        return {"params": encoder_part(self.params), "batch_stats": encoder_part(self.batch_stats)}

    def parts(self) -> dict[str, Any]:
        """The momentum encoder and the predictor (``Algorithm.parts``: moco-v3's checkpoint)."""
        momentum = {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        predictor = {k: getattr(self, k)["predictor"] for k in ("params", "batch_stats")}
        return {"momentum_encoder": momentum, "predictor": predictor}


def create_state(rng, encoder, predictor, optimizer, image_shape) -> MoCoV3State:
    """Fresh state: the momentum encoder starts as an exact copy of the base encoder."""
    encoder_rng, predictor_rng = jax.random.split(rng)
    dummy = jnp.zeros((2, *image_shape), jnp.float32)
    # train=False: no batch statistics, so BN synced over a mesh axis initialises outside shard_map.
    variables = encoder.init(encoder_rng, dummy, train=False)
    _, embedding = jax.eval_shape(lambda: encoder.apply(variables, dummy, train=False))
    predictor_vars = predictor.init(predictor_rng, jnp.zeros(embedding.shape), train=False)
    params = {**variables["params"], "predictor": predictor_vars["params"]}
    batch_stats = {
        **variables.get("batch_stats", {}),
        "predictor": predictor_vars.get("batch_stats", {}),
    }
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return MoCoV3State(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        ema_params=copy(encoder_part(params)),
        ema_batch_stats=copy(encoder_part(batch_stats)),
        opt_state=optimizer.init(params),
    )


def load_encoder(state: MoCoV3State, variables: dict[str, Any]) -> MoCoV3State:
    """``state`` with ``variables`` (backbone + projector) in the base and momentum encoders;
    the predictor and the optimizer state stay as they are."""
    params = encoder_part(variables["params"])
    batch_stats = encoder_part(variables.get("batch_stats", {}))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return state.replace(
        params={**state.params, **params},
        batch_stats={**state.batch_stats, **batch_stats},
        ema_params={**state.ema_params, **copy(params)},
        ema_batch_stats={**state.ema_batch_stats, **copy(batch_stats)},
    )


def frozen_tensors(stop_grad_conv1: bool):
    """``params -> tree of bools``: True for what moco-v3 freezes with ``requires_grad=False``
    and so never updates (the ViT's patch projection with ``stop_grad_conv1``)."""

    def frozen(params: Any) -> Any:
        def is_frozen(path, _):
            names = [getattr(entry, "key", None) for entry in path]
            return stop_grad_conv1 and names[:3] == ["backbone", "patch_embed", "proj"]

        return jax.tree_util.tree_map_with_path(is_frozen, params)

    return frozen


def make_train_step(
    encoder, predictor, optimizer, schedule, momentum_at, mesh: Mesh, *, temperature: float,
    bn_mode: str, ordered: bool = False,
):  # fmt: skip
    """The jitted step ``(state, view_1, view_2) -> (state, metrics)``; donates ``state``.

    ``encoder`` and ``predictor`` must have been built with ``bn_axis_name(bn_mode)``. Views are
    global arrays ``[global_batch, H, W, C]`` sharded over the mesh's ``data`` axis. ``ordered``:
    means over devices in device order (``data_parallel.device_mean``).
    """
    mean = device_mean(mesh, ordered)

    def forward(module, params, batch_stats, images, **kwargs):
        variables = {"params": params, "batch_stats": batch_stats}
        out, new = module.apply(variables, images, train=True, mutable="batch_stats", **kwargs)
        return out, new["batch_stats"]

    def per_device(state: MoCoV3State, x1: jax.Array, x2: jax.Array):
        m = momentum_at(state.step)

        # 2. Momentum update first, then the keys of both views (no gradient).
        ema_params = momentum_update(encoder_part(state.params), state.ema_params, m)
        (_, k1), ema_stats = forward(encoder, ema_params, state.ema_batch_stats, x1)
        (_, k2), ema_stats = forward(encoder, ema_params, ema_stats, x2)
        k1_all, k2_all = gathered_keys(k1, DATA_AXIS), gathered_keys(k2, DATA_AXIS)

        # 1 and 3. Queries of both views (BN running statistics: view 1's, then view 2's).
        def loss_fn(params):
            stats = state.batch_stats
            queries = []
            for view in (x1, x2):
                (_, z), enc_stats = forward(
                    encoder, encoder_part(params), encoder_part(stats), view
                )
                q, pred_stats = forward(predictor, params["predictor"], stats["predictor"], z)
                stats = {**enc_stats, "predictor": pred_stats}
                queries.append(q)
            loss_1, logits_1, labels = contrastive_loss(queries[0], k2_all, temperature, DATA_AXIS)
            loss_2, logits_2, _ = contrastive_loss(queries[1], k1_all, temperature, DATA_AXIS)
            return loss_1 + loss_2, (stats, logits_1, logits_2, labels)

        (loss, (batch_stats, logits_1, logits_2, labels)), grads = mean_value_and_grad(
            loss_fn, state.params, mean
        )

        # 4. Optimizer update.
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        if bn_mode != "sync":  # per-device running statistics: keep their mean
            batch_stats, ema_stats = mean(batch_stats), mean(ema_stats)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            ema_params=ema_params,
            ema_batch_stats=ema_stats,
            opt_state=opt_state,
        )
        cosines = jnp.concatenate([logits_1, logits_2]) * temperature  # both loss terms' rows
        metrics = contrastive_metrics(
            loss, cosines, ema_params, encoder_part(params), mean, jnp.concatenate([labels] * 2)
        )
        metrics["learning_rate"] = jnp.float32(schedule(state.step))
        metrics["moco_momentum"] = m
        return new_state, metrics

    return jit_step(per_device, mesh)


@register_algorithm("moco_v3")
def build(config: Any, mesh: Mesh, steps_per_epoch: int) -> Algorithm:
    """MoCo v3 from a validated config: encoder, predictor, optimizer, schedules, the step."""
    axis = bn_axis_name(config.model.bn_mode)
    encoder = build_encoder(config.model, axis)
    predictor = build_predictor(config.model, axis)
    schedule = make_lr_schedule(config.optim, config.batch_size, steps_per_epoch, config.epochs)
    frozen = frozen_tensors(bool(config.model.stop_grad_conv1))
    optimizer = make_optimizer(config.optim, schedule, frozen)
    momentum_at = momentum_schedule(
        config.moco.momentum, config.moco.momentum_cosine, steps_per_epoch, config.epochs
    )
    step = make_train_step(
        encoder,
        predictor,
        optimizer,
        schedule,
        momentum_at,
        mesh,
        temperature=config.moco.temperature,
        bn_mode=config.model.bn_mode,
        ordered=config.ordered_reductions,
    )
    return Algorithm(
        name="moco_v3",
        model=encoder,
        schedule=schedule,
        init_state=lambda rng: create_state(
            rng, encoder, predictor, optimizer, image_shape(config)
        ),
        train_step=step,
        encoder_variables=MoCoV3State.encoder_variables,
        load_encoder=load_encoder,
        parts=MoCoV3State.parts,
    )
