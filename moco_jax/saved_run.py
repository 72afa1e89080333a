"""What a workdir holds of its run, read without changing anything: its config and the steps of
its checkpoints (for ``evaluate``, ``export`` and linear evaluation's ``pretrained``)."""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from moco_jax.regular_files import read_text
from moco_jax.validation import ConfigError

# A config.json without these is not a moco_jax run's config.
CONFIG_SECTIONS = ("dataset", "model", "moco", "optim", "augment", "checkpoint", "knn")


def load_run_config(workdir: epath.Path) -> ml_collections.ConfigDict:
    """The config a run was started with (``ConfigError`` naming the file if it is not one)."""
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
    return ml_collections.ConfigDict(saved)


def saved_steps(workdir: epath.Path) -> list[int]:
    """The steps of the checkpoints in ``workdir`` (read-only: creates nothing)."""
    from moco_jax.checkpoint_format import open_manager

    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    manager = open_manager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()
