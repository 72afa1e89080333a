"""Whether a checkpoint fits a config: the fields that decide the state's shapes, compared by name.

A checkpoint saved with other values of ``STATE_FIELDS`` cannot be resumed (nor, for a linear
evaluation, with another ``SOURCE_FIELDS``: another pretrained backbone); ``init_from`` can
still take its encoder when ``ENCODER_FIELDS`` agree. Every refusal names the fields with both
values; other differences are allowed and logged.
"""

from __future__ import annotations

import json
from typing import Any

from absl import logging

from moco_jax import storage
from moco_jax.config.checks import ConfigError
from moco_jax.run import fingerprint

# Config fields that decide the shapes of the state: a checkpoint saved with other values cannot
# be resumed.
STATE_FIELDS = (
    "algorithm",
    "model.backbone",
    "model.width_multiplier",
    "model.cifar_stem",
    "model.head",
    "model.dim",
    "moco.queue_size",
    "dataset.num_channels",
    "linear.num_classes",
    "linear.train_backbone",
)
# Fields that decide the data order and the epochs' boundaries (with the device count, which
# the saved ``steps_per_epoch`` covers): a resumed run with other values would neither continue
# the same order nor average the epoch's loss over the right number of steps.
SCHEDULE_FIELDS = ("batch_size", "dataset.name", "dataset.max_train_examples")
ENCODER_FIELDS = ("model.backbone", "model.width_multiplier", "model.cifar_stem")
# Where a linear evaluation's backbone came from: its checkpoints hold a classifier trained on
# those features, so a resumed run must read the same source. Compared as the place each path
# names (``storage.canonical``): a relative and an absolute spelling of one directory agree.
SOURCE_FIELDS = ("linear.pretrained",)
# Fields that may change between a run and its resumption without a warning.
UNREMARKABLE_FIELDS = (
    "dataset.data_dir", "init_from", "profile_steps", "profile_first_step", "knn.baselines",
)  # fmt: skip


def config_dict(config: Any) -> dict:
    """The config as plain JSON values (tuples become lists, as in ``config.json``)."""
    return json.loads(config.to_json_best_effort())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def refuse_other_config(
    saved: dict, current: dict, fields: tuple[str, ...], where: Any, what: str = ""
) -> None:
    """``ConfigError`` naming every field of ``fields`` that differs (saved value, current value).

    Other differing fields are only logged: changing the lr or the number of epochs of a run on
    resumption is allowed. A field missing from an older checkpoint's config takes its default.
    """
    old, new = _flatten(saved), _flatten(current)
    old.setdefault("algorithm", "moco")  # checkpoints from before there was a choice
    differ = [f for f in fields if not _same(f, old.get(f), new.get(f))]
    if differ:
        listing = ", ".join(f"{f} {old.get(f)!r} -> {new.get(f)!r}" for f in differ)
        if what:
            advice = "init_from needs the same backbone"
        elif set(differ) <= set(SOURCE_FIELDS):
            advice = "Resume with the same --pretrained, or evaluate the other in another --workdir"
        else:
            advice = (
                "Use another --workdir; to start there from this checkpoint's encoder weights "
                f"only, add --config.init_from={where}"
            )
        raise ConfigError(
            f"{what}checkpoint {where} was saved with a different config ({listing}: checkpoint "
            f"-> now). {advice}."
        )
    others = [
        f"{f} {old.get(f)!r} -> {new.get(f)!r}"
        for f in sorted(set(old) | set(new))
        if not _same(f, old.get(f), new.get(f)) and f not in UNREMARKABLE_FIELDS
    ]
    if others and not what:
        logging.warning("resuming %s with changed settings: %s", where, ", ".join(others))


def _same(field: str, old: Any, new: Any) -> bool:
    if field in SOURCE_FIELDS and isinstance(old, str) and isinstance(new, str):
        return storage.canonical(old) == storage.canonical(new)
    return old == new


def refuse_other_shapes(saved: dict, template: Any, where: Any) -> None:
    problems = fingerprint.shape_problems(saved, fingerprint.state_shapes(template))
    if problems:
        raise ConfigError(
            f"checkpoint {where} holds a state of other shapes than this config's: "
            + "; ".join(problems[:4])
            + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
            + f". Use another --workdir; to start there from this checkpoint's encoder weights "
            f"only, add --config.init_from={where}."
        )
