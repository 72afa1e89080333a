"""From a config to a model, an initial state and a compiled step: what every entry point shares."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from moco_jax.mesh import replicated
from moco_jax.models import build_encoder
from moco_jax.optim import Schedule, make_lr_schedule, make_optimizer
from moco_jax.state import MoCoState, create_state
from moco_jax.step import DATA_AXIS, TrainStep, bn_axis_name, make_train_step
from moco_jax.validation import validate_config


@dataclasses.dataclass(frozen=True)
class Engine:
    """The pieces of a MoCo run built from one config."""

    model: nn.Module
    optimizer: optax.GradientTransformation
    schedule: Schedule
    train_step: TrainStep
    mesh: Mesh

    def init_state(
        self, rng: jax.Array, image_shape: tuple[int, int, int], queue_size: int
    ) -> MoCoState:
        """A fresh state, replicated over the mesh."""
        # Built inside jit with replicated outputs: every process computes the same state.
        return jax.jit(
            lambda r: create_state(r, self.model, self.optimizer, image_shape, queue_size),
            out_shardings=replicated(self.mesh),
        )(rng)


def build_engine(config: Any, mesh: Mesh, steps_per_epoch: int) -> Engine:
    """Validate ``config`` for ``mesh`` and build model, optimizer, schedule and step."""
    validate_config(config, mesh.shape[DATA_AXIS])
    model = build_encoder(config.model, bn_axis_name(config.model.bn_mode))
    schedule = make_lr_schedule(config.optim, config.batch_size, steps_per_epoch, config.epochs)
    optimizer = make_optimizer(config.optim, schedule)
    train_step = make_train_step(
        model,
        optimizer,
        schedule,
        mesh,
        momentum=config.moco.momentum,
        temperature=config.moco.temperature,
        bn_mode=config.model.bn_mode,
    )
    return Engine(model, optimizer, schedule, train_step, mesh)
