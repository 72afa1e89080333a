"""What a workdir holds of its run, read without changing anything: its config, the steps of
its checkpoints and the newest intact one (for ``evaluate``, ``export``, ``init_from`` and linear
evaluation's ``pretrained``).

Reading another run's checkpoints differs from a run resuming its own (``checkpointing.py``):
a damaged step is skipped with a warning but left where it is, and that run may still be
training, so a step its retention deletes while it is being read is not damage: the reader
lists the steps again and reads the newest one left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import ml_collections
from absl import logging
from etils import epath

from moco_jax.config.checks import ConfigError
from moco_jax.config.defaults import base_config, linear_config
from moco_jax.run.checkpoint_format import CheckpointError, Damaged
from moco_jax.storage import check_reachable, read_text

if TYPE_CHECKING:
    from orbax.checkpoint import CheckpointManager

T = TypeVar("T")
# How long the directory of a step that failed to read may take to disappear: retention's
# deletion of a checkpoint (a few dozen files) is under way when the read fails half-way.
DELETION_GRACE_S = 0.5
MAX_DELETED = 10  # steps deleted under the reader before it gives up (a run saving every step)

# A config.json without these is not a moco_jax run's config.
CONFIG_SECTIONS = ("dataset", "model", "moco", "optim", "augment", "checkpoint", "knn")


def load_run_config(workdir: epath.Path) -> ml_collections.ConfigDict:
    """The config a run was started with (``ConfigError`` naming the file if it is not one),
    merged onto the defaults (``with_defaults``): a run saved before a field existed reads as
    that field's default, so no reader asks whether a field is there."""
    check_reachable("workdir", workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist (or is not a directory)")
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a moco_jax workdir?")
    try:
        saved = json.loads(read_text(path))
    except ValueError as err:  # truncated, not JSON, not UTF-8
        raise ConfigError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a moco_jax config (not a JSON object)")
    missing = [section for section in CONFIG_SECTIONS if section not in saved]
    if missing:
        raise ConfigError(f"{path} is not a moco_jax config (no {', '.join(missing)})")
    return with_defaults(saved, path)


def with_defaults(saved: dict, path: epath.Path | str) -> ml_collections.ConfigDict:
    """``saved`` (the object in config.json at ``path``) set onto ``base_config()``
    (``linear_config()`` for a linear evaluation): every field it lacks, one added after it was
    written, keeps its default, which is what the code of its time did without the field.

    Each value is assigned, so ml_collections checks its type as it checks a command-line
    override (an int is no string; JSON's lists become the tuples of the defaults):
    ``ConfigError`` naming the file and the field otherwise. Keys the defaults do not know (a
    fork's) are added as they are.
    """
    config = linear_config() if saved.get("algorithm") == "linear" else base_config()
    _assign(config, saved, path, "")
    return config


def _assign(node: ml_collections.ConfigDict, saved: dict, path: epath.Path | str, prefix: str):
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
            _assign(node[key], value, path, f"{prefix}{key}.")
            continue
        try:
            node[key] = value
        except TypeError:
            kind = node.get_type(key).__name__
            raise ConfigError(
                f"{path}: {prefix}{key} must be of type {kind}, got {value!r}"
            ) from None


def saved_steps(workdir: epath.Path) -> list[int]:
    """The steps of the checkpoints in ``workdir`` (read-only: creates nothing)."""
    from moco_jax.run.checkpoint_format import open_manager

    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    manager = open_manager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def newest_intact(
    manager: CheckpointManager, read: Callable[[int], T], steps: Sequence[int] | None = None
) -> tuple[int, T] | None:
    """``(step, read(step))`` of the newest step of ``manager``'s (read-only) directory, of
    ``steps`` if given, that ``read`` reads without ``Damaged``; None if there is none at all.

    Damaged steps are skipped with a warning naming them and left in place. A step whose
    directory is gone after its read failed was deleted by the run that wrote it (retention):
    the steps are listed again and the newest one left is read. ``CheckpointError`` naming the
    directory when no step can be read, saying which were damaged and which were deleted.
    """
    directory = epath.Path(manager.directory)
    damaged: list[tuple[int, str]] = []
    deleted: list[int] = []
    tried: set[int] = set()
    while len(deleted) < MAX_DELETED:
        manager.reload()
        listed = set(manager.all_steps())
        if steps is not None:
            listed &= set(steps)
        untried = sorted(listed - tried, reverse=True)
        if not untried:
            break
        step = untried[0]
        tried.add(step)
        try:
            result = read(step)
        except Damaged as err:
            if _deleted(directory / str(step)):
                deleted.append(step)
            else:
                damaged.append((step, str(err)))
            continue
        for bad_step, reason in damaged:
            logging.warning(
                "skipped damaged checkpoint step %d of %s (%s); left in place. Reading step %d.",
                bad_step, directory, reason, step,
            )  # fmt: skip
        return step, result
    if not (damaged or deleted):
        return None
    raise CheckpointError(_none_readable(directory, damaged, deleted, steps is not None))


def _deleted(step_directory: epath.Path) -> bool:
    """Whether a step whose read failed is gone (waiting ``DELETION_GRACE_S`` for a deletion
    under way to finish) rather than damaged."""
    deadline = time.monotonic() + DELETION_GRACE_S
    while step_directory.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _none_readable(directory: epath.Path, damaged: list, deleted: list[int], chosen: bool) -> str:
    """Why no checkpoint of ``directory`` (of the ``chosen`` steps) could be read: damage (left
    as it is) or a run that deleted them while they were read (never advice to throw a healthy
    run away)."""
    gone = ", ".join(map(str, deleted))
    if chosen and len(damaged) == 1 and not deleted:
        step, reason = damaged[0]
        return f"checkpoint step {step} in {directory} is damaged ({reason}); nothing was changed"
    if not damaged:
        return (
            f"the checkpoints of {directory} were deleted while being read (steps {gone}): is a "
            f"run still saving there and deleting older ones (checkpoint.keep)? Rerun, or read a "
            f"step it keeps for good (checkpoint.keep_every_steps)"
        )
    reasons = "; ".join(f"step {s}: {r}" for s, r in damaged)
    if deleted:
        reasons += f"; steps {gone} were deleted while being read"
        return f"no checkpoint in {directory} can be read ({reasons}); nothing there was changed"
    return f"every checkpoint in {directory} is damaged ({reasons}); nothing there was changed"
