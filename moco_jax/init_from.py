"""``config.init_from``: start a run from another run's encoder weights, by orbax partial restore.

Only the encoder's ``params`` and ``batch_stats`` are read (``partial_restore``); the backbone must
have the same shapes (else ``ConfigError`` naming the fields), the head is taken too when its
shapes agree and stays freshly initialised otherwise. Step, optimizer state, queue and RNG stay
fresh. How fine-tuning and linear evaluation start from pretraining, and how a run with another
K or dim reuses one.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from moco_jax import fingerprint
from moco_jax.checkpoint_format import LEGACY_ITEM, STATE_ITEM, open_manager, read_meta
from moco_jax.compatibility import ENCODER_FIELDS, config_dict, refuse_other_config
from moco_jax.validation import ConfigError

ENCODER_COLLECTIONS = ("params", "batch_stats")


def find_checkpoint(path: str | epath.Path) -> tuple[epath.Path, int]:
    """``(checkpoints directory, step)`` of a workdir or checkpoints directory (its latest step)
    or of one step's directory."""
    path = epath.Path(path)
    if not path.exists():
        raise ConfigError(f"init_from: {path} does not exist")
    if path.name.isdigit() and not (path / "checkpoints").is_dir():
        return path.parent, int(path.name)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    manager = open_manager(root)
    step = manager.latest_step()
    manager.close()
    if step is None:
        raise ConfigError(f"init_from: no checkpoint in {root}")
    return root, step


def load_encoder_weights(path: str, template: Any, setup: Any) -> Any:
    """``template`` (a fresh state of ``setup``) with the encoder of the checkpoint at ``path``."""
    root, step = find_checkpoint(path)
    where = root / str(step)
    manager = open_manager(root)
    try:
        present, meta = read_meta(manager, step)
        if meta is not None:
            saved_config = meta.get("config", {})
            current = config_dict(setup.config)
            refuse_other_config(saved_config, current, ENCODER_FIELDS, where, "init_from ")
        item = LEGACY_ITEM if LEGACY_ITEM in present else STATE_ITEM
        tree = manager.item_metadata(step)[item]
        tree = tree.tree if hasattr(tree, "tree") else tree
        wanted = {name: tree[name] for name in ENCODER_COLLECTIONS if name in tree}
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restore = ocp.args.PyTreeRestore(item=wanted, restore_args=as_numpy, partial_restore=True)
        saved = manager.restore(step, args=ocp.args.Composite(**{item: restore}))[item]
    finally:
        manager.close()
    current = setup.algorithm.encoder_variables(template)
    loaded = {name: dict(current.get(name, {})) for name in ENCODER_COLLECTIONS}
    taken = []
    for part in ("backbone", "head"):
        new = {k: {part: current.get(k, {}).get(part)} for k in ENCODER_COLLECTIONS}
        old = {k: {part: saved.get(k, {}).get(part)} for k in ENCODER_COLLECTIONS}
        problems = fingerprint.shape_problems(fingerprint.shapes(old), fingerprint.shapes(new))
        if problems and part == "backbone":
            raise ConfigError(
                f"init_from {where}: the backbone's arrays differ from this config's: "
                + "; ".join(problems[:4])
            )
        if problems:
            logging.warning("init_from: head differs (%s); it starts fresh", problems[0])
            continue
        for name in ENCODER_COLLECTIONS:
            if new[name][part] is not None:
                loaded[name][part] = jax.tree.map(_placed_like, old[name][part], new[name][part])
        taken.append(part)
    logging.info("init_from %s: loaded the %s", where, " and ".join(taken))
    return setup.algorithm.load_encoder(template, loaded)


def _placed_like(saved: np.ndarray, like: jax.Array) -> jax.Array:
    """``saved`` laid out like ``like``; works when other processes own some of the devices."""
    host = np.asarray(saved, like.dtype)
    return jax.make_array_from_callback(host.shape, like.sharding, lambda index: host[index])
