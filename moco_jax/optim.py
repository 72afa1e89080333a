"""Learning-rate schedules and the optimizer of the reference (SGD, coupled weight decay)."""

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
    """Per-epoch schedule of the official ``main_moco.py`` (constant within an epoch).

    ``cosine``: ``lr * 0.5 * (1 + cos(pi * epoch / epochs))`` with epochs counted from 0.
    ``step``: ``lr * 0.1 ** (number of milestones <= epoch)``. ``constant``: ``lr``.
    """
    peak = scaled_learning_rate(optim_config, global_batch)
    kind = optim_config.schedule
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
        raise ValueError(f"unknown lr schedule {kind!r}; choose cosine, step or constant")

    return schedule


def make_optimizer(optim_config: Any, schedule: Schedule) -> optax.GradientTransformation:
    """SGD with momentum and PyTorch-style coupled weight decay on every parameter.

    ``torch.optim.SGD(weight_decay=wd)`` adds ``wd * p`` to the gradient before the momentum
    buffer; ``add_decayed_weights`` before ``sgd`` does the same.
    """
    return optax.chain(
        optax.add_decayed_weights(optim_config.weight_decay),
        optax.sgd(schedule, momentum=optim_config.momentum, nesterov=False),
    )
