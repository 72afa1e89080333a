"""Learning-rate schedules and the one optimizer factory: MoCo v1/v2's SGD, MoCo v3's LARS and
AdamW, chosen by ``optim.name``.

Every optimizer is made of optax transformations. MoCo v3's (moco-v3 ``main_moco.py``,
``moco/optimizer.py``): LARS for ResNets (``optax.lars``'s links, the trust ratio and the weight
decay masked to tensors with ndim > 1), AdamW for ViTs (``optax.adamw``, decoupled decay on every
trained tensor as ``torch.optim.AdamW(model.parameters())`` does); tensors the official freezes
(``requires_grad=False``: the patch projection with ``stop_grad_conv1``) get a zero update
(``optax.set_to_zero`` under ``optax.multi_transform``), so they never move and take no decay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


def scaled_learning_rate(optim_config: Any, global_batch: int) -> float:
    """Linear scaling rule: ``base_lr`` is per 256 images."""
    return optim_config.base_lr * global_batch / 256


def make_lr_schedule(
    optim_config: Any, global_batch: int, steps_per_epoch: int, epochs: int
) -> Schedule:
    """Per-epoch schedule of the official ``main_moco.py`` (constant within an epoch), or
    MoCo v3's per-step one.

    ``cosine``: ``lr * 0.5 * (1 + cos(pi * epoch / epochs))`` with epochs counted from 0.
    ``step``: ``lr * 0.1 ** (number of milestones <= epoch)``. ``constant``: ``lr``.
    ``warmup_cosine`` (moco-v3's ``adjust_learning_rate``, e = step / steps_per_epoch the
    fractional epoch, W = ``optim.warmup_epochs``): ``lr * e / W`` while ``e < W``, then
    ``lr * 0.5 * (1 + cos(pi * (e - W) / (epochs - W)))``.
    """
    peak = scaled_learning_rate(optim_config, global_batch)
    kind = optim_config.schedule
    if kind == "warmup_cosine":
        warmup = int(optim_config.warmup_epochs) * steps_per_epoch
        total = epochs * steps_per_epoch
        if warmup == 0:  # optax's linear piece would warn about 0 transition steps
            return optax.cosine_decay_schedule(peak, total)
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total)
    milestones = jnp.asarray(tuple(optim_config.lr_milestones) or (0,), jnp.int32)
    has_milestones = bool(tuple(optim_config.lr_milestones))

    def schedule(step: jax.Array) -> jax.Array:
        epoch = jnp.asarray(step) // steps_per_epoch
        if kind == "cosine":
            return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
        if kind == "step":
            passed = jnp.sum(epoch >= milestones) if has_milestones else 0
            return peak * 0.1**passed
        if kind == "constant":
            return jnp.asarray(peak, jnp.float32) + 0.0 * epoch
        raise ValueError(
            f"unknown lr schedule {kind!r}; choose cosine, step, constant or warmup_cosine"
        )

    return schedule


def sgd(optim_config: Any, schedule: Schedule) -> optax.GradientTransformation:
    """SGD with momentum and PyTorch-style coupled weight decay on every parameter.

    ``torch.optim.SGD(weight_decay=wd)`` adds ``wd * p`` to the gradient before the momentum
    buffer; ``add_decayed_weights`` before ``sgd`` does the same.
    """
    return optax.chain(
        optax.add_decayed_weights(optim_config.weight_decay),
        optax.sgd(schedule, momentum=optim_config.momentum, nesterov=False),
    )


LARS_TRUST_COEFFICIENT = 0.001  # moco-v3's LARS default
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which moco-v3 keeps


def is_matrix(params: Any) -> Any:
    """True for tensors with ndim > 1 (moco-v3's LARS: no decay or trust ratio on the others,
    the biases and normalisation scales/offsets)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(schedule: Schedule, weight_decay: float, momentum: float) -> optax.GradientTransformation:
    """moco-v3's ``LARS``: ``optax.lars``'s links, momentum before the learning rate.

    ``optax.lars`` chains (decay, trust ratio, lr, momentum): its momentum buffer sums updates
    already scaled by their step's lr. moco-v3's LARS (like ``torch.optim.SGD`` and
    ``optax.sgd``) keeps ``mu = m * mu + g'`` and steps by ``lr * mu``: the same while the lr is
    constant, not during the warm-up. So the last two links are swapped; the rest is
    ``optax.lars``: decay and trust ratio ``0.001 * |p| / |g + wd p|`` (1 where a norm is 0) on
    ndim > 1 tensors only.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=is_matrix),
        optax.masked(
            optax.scale_by_trust_ratio(trust_coefficient=LARS_TRUST_COEFFICIENT), is_matrix
        ),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(
    optim_config: Any, schedule: Schedule, frozen: Callable[[Any], Any] | None = None
) -> optax.GradientTransformation:
    """The optimizer ``optim.name`` names (``sgd``: MoCo v1/v2's and linear evaluation's;
    ``lars``, ``adamw``: MoCo v3's) at ``schedule``'s learning rate; ``frozen(params)`` marks
    (True) tensors that must never move (zero updates)."""
    name = optim_config.name
    if name == "lars":
        inner = lars(schedule, optim_config.weight_decay, optim_config.momentum)
    elif name == "adamw":
        b1, b2 = optim_config.betas
        inner = optax.adamw(
            schedule, b1=b1, b2=b2, eps=ADAM_EPS, weight_decay=optim_config.weight_decay
        )
    elif name == "sgd":
        inner = sgd(optim_config, schedule)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose sgd, lars or adamw")
    if frozen is None:
        return inner

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda f: "frozen" if f else "trained", frozen(params))

    return optax.multi_transform({"trained": inner, "frozen": optax.set_to_zero()}, labels)
