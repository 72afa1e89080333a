"""Self-supervised algorithms the engine runs, chosen by ``config.algorithm``.

An algorithm is a module with a ``build(config, mesh, steps_per_epoch) -> Algorithm`` function,
registered under a name. The trainer, checkpointing, evaluation and the benchmarks only use the
``Algorithm`` record below, so a new algorithm (MoCo v3: no queue, a predictor, a momentum
schedule, LARS/AdamW) is a sibling module, not a change to them:

- ``init_state(rng)``: a fresh state, a ``flax.struct.dataclass`` whose leaves are arrays only and
  which holds everything needed to resume bit-for-bit, including ``step`` (int32 scalar, the
  number of optimizer steps taken) and ``params`` (the trained weights). Unjitted: the set-up path
  (``moco_jax.assemble``) jits it with replicated outputs on the mesh.
- ``train_step(state, view_q, view_k) -> (state, metrics)``: jitted, donates ``state``; the views
  are global ``[batch, H, W, C]`` float arrays sharded over the mesh's ``data`` axis; metrics is a
  dict of replicated scalars with at least ``loss`` and ``learning_rate``. ``inputs`` says when
  the step takes something else (linear evaluation: one view and its labels).
- ``encoder_variables(state)``: the Flax variables of the encoder that evaluation and transfer use
  (``model.apply(variables, images, train=False) -> (pooled features, embedding)``).
- ``load_encoder(state, variables)``: ``state`` with ``variables`` (same tree as
  ``encoder_variables``) as its encoder wherever the algorithm keeps one (``init_from``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

State = Any  # a flax.struct.dataclass of arrays (see the module docstring)
TrainStep = Callable[[State, jax.Array, jax.Array], tuple[State, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What the engine needs of an algorithm (see the module docstring)."""

    name: str
    model: nn.Module  # the encoder evaluated by kNN / linear probes
    schedule: Callable[[jax.Array], jax.Array]  # step -> learning rate
    init_state: Callable[[jax.Array], State]
    train_step: TrainStep
    encoder_variables: Callable[[State], dict[str, Any]]
    load_encoder: Callable[[State, dict[str, Any]], State]
    # What ``train_step`` takes after the state: "two_views" (view_q, view_k), "labelled_view"
    # (one augmented view, labels) or "features" (features computed once, labels).
    inputs: str = "two_views"


def image_shape(config: Any) -> tuple[int, int, int]:
    """``[H, W, C]`` of the images a config's model sees (after cropping)."""
    dataset = config.dataset
    return (dataset.image_size, dataset.image_size, dataset.num_channels)


Builder = Callable[[Any, jax.sharding.Mesh, int], Algorithm]
_ALGORITHMS: dict[str, Builder] = {}


def register_algorithm(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``build(config, mesh, steps_per_epoch)`` becomes ``config.algorithm=name``."""

    def decorator(build: Builder) -> Builder:
        if name in _ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is already registered")
        _ALGORITHMS[name] = build
        return build

    return decorator


def available_algorithms() -> list[str]:
    return sorted(_ALGORITHMS)


def build_algorithm(config: Any, mesh: jax.sharding.Mesh, steps_per_epoch: int) -> Algorithm:
    """The algorithm ``config.algorithm`` names, built for ``mesh`` (config already validated)."""
    return _ALGORITHMS[config.algorithm](config, mesh, steps_per_epoch)


# register "linear", "moco" (v1/v2) and "moco_v3"
from moco_jax.algorithms import linear, moco, moco_v3  # noqa: E402,F401
