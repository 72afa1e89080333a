"""Self-supervised algorithms the engine runs, chosen by ``config.algorithm``.

An algorithm is a module with a ``build(config, mesh, steps_per_epoch) -> Algorithm`` function,
registered under a name. The ``Algorithm`` record below is the only door to it: the trainer,
checkpointing, evaluation, export, the compile reports and the benchmarks read a state through its
fields and never through the state's own attributes, so a new algorithm is a sibling module, not
a change to them. The three here share one shape, which a fork can copy:

- a ``flax.struct.dataclass`` state with ``step``, ``params``, ``batch_stats`` and whatever else
  the step needs, and two methods: ``encoder_variables()`` and ``parts()`` (the record's fields);
- ``create_state(rng, ...)``, ``load_encoder(state, variables)`` and
  ``make_train_step(..., mesh, ...)``: a per-device step (``state.replace(...)`` by field name,
  means over devices by ``data_parallel.device_mean``) jitted by ``data_parallel.jit_step``;
- ``build(config, mesh, steps_per_epoch)``, registered, which makes the schedule and the optimizer
  (``moco_jax.optim``) and returns the record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

State = Any  # a flax.struct.dataclass of arrays (see ``Algorithm.init_state``)
Variables = dict[str, Any]  # Flax variables: {"params": ..., "batch_stats": ...}
TrainStep = Callable[[State, jax.Array, jax.Array], tuple[State, dict[str, jax.Array]]]


def no_parts(state: State) -> dict[str, Any]:
    """An algorithm whose state holds nothing but its encoder for the tools outside the step."""
    del state
    return {}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What the engine needs of an algorithm; the fields are what a fork provides."""

    name: str
    """The name it is registered under (``config.algorithm``)."""

    model: nn.Module
    """The encoder that evaluation and transfer use: ``model.apply(encoder_variables(state),
    images, train=False) -> (pooled features, embedding)`` (kNN on both, linear probes on the
    pooled features)."""

    schedule: Callable[[jax.Array], jax.Array]
    """``step -> learning rate`` of the optimizer (the step logs it as ``learning_rate``)."""

    init_state: Callable[[jax.Array], State]
    """``rng -> state``: a fresh state, a ``flax.struct.dataclass`` whose leaves are arrays only
    and which holds everything needed to resume bit for bit, including ``step`` (int32 scalar,
    the number of optimizer steps taken) and ``params`` (the trained weights). Its field names are
    stored in checkpoints: renaming one makes older checkpoints unreadable. Unjitted: the set-up
    path (``moco_jax.assemble``) jits it with replicated outputs on the mesh."""

    train_step: TrainStep
    """``(state, a, b) -> (state, metrics)``: jitted, donates ``state``. ``a`` and ``b`` are
    global arrays sharded over the mesh's ``data`` axis, as ``inputs`` says; ``metrics`` is a dict
    of replicated scalars with at least ``loss`` and ``learning_rate`` (every entry is logged)."""

    encoder_variables: Callable[[State], Variables]
    """``state -> variables`` of ``model``: what kNN, linear evaluation, ``init_from``, export and
    the compile reports use (the query / base encoder of a contrastive method)."""

    load_encoder: Callable[[State, Variables], State]
    """``(state, variables) -> state`` with ``variables`` (the tree of ``encoder_variables``) as
    its encoder wherever the algorithm keeps one, e.g. also in a momentum encoder
    (``init_from``, ``linear.pretrained``)."""

    parts: Callable[[State], dict[str, Any]] = no_parts
    """``state -> {name: arrays}``: what the tools outside the step read besides the encoder,
    under these names (leave out what the algorithm does not have):

    - ``"classifier"``: ``{"kernel": [F, C], "bias": [C]}``, a linear classifier on the pooled
      features. Its test accuracy is then the run's evaluation (``evaluate linear``; the compile
      reports compile that instead of kNN), and export writes it as torchvision's ``fc`` /
      timm's ``head``.
    - ``"momentum_encoder"``: variables of a momentum (key) encoder, the tree of
      ``encoder_variables``; with ``"queue"`` (``[K, D]`` keys) and ``"queue_ptr"`` (int32
      scalar) ``--format=moco`` writes the official MoCo v1/v2 checkpoint, with ``"predictor"``
      (variables of MoCo v3's predictor) moco-v3's.
    """

    inputs: str = "two_views"
    """What ``train_step`` takes after the state: ``"two_views"`` (two augmentations of the
    same images), ``"labelled_view"`` (one augmented view, its labels) or ``"features"``
    (features computed once by ``model``, their labels)."""


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
