"""Orbax checkpoints of the whole ``MoCoState``, made to survive preemption, damage and mistakes.

Layout: ``<workdir>/checkpoints/<step>/`` holds two orbax items:

- ``state``: the ``MoCoState`` (online and EMA params and BN statistics, optimizer state, queue,
  queue pointer, step, RNG key);
- ``meta``: JSON with the run's config, a fingerprint of every array of ``state`` and the
  trainer's running scalars (``extra``: the loss summed over the epoch so far).

The input pipeline's position is ``state.step``: the order of the resident datasets
(``moco_jax.data.resident.ResidentViews``) and of the streamed ones (``moco_jax.data.streaming``)
is a pure function of ``(seed, step)``, so a restored step resumes the data exactly and nothing
else needs saving for it. A pipeline with state of its own can put it in ``extra``.

What the ``Checkpointer`` guarantees:

- Saves are asynchronous (the device-to-host copy blocks, the write does not) and atomic (orbax
  writes into a temporary directory and renames it when complete): a process killed mid-save
  leaves no step behind, and the temporary directory is removed on the next start. Every process
  of a multi-host run calls ``save``; orbax coordinates them and the primary host writes ``meta``.
- A state with a NaN or infinity is never saved: ``save`` raises ``TrainingDiverged`` instead and
  the previous checkpoints stay as they were.
- ``restore_latest`` refuses a checkpoint of a different config (``ConfigError`` naming the fields
  with both values), and skips damaged ones (unreadable, truncated, or whose arrays no longer
  match the fingerprint taken at save time): they are moved to ``<workdir>/checkpoints_damaged/``
  with a warning, and the newest intact checkpoint is used.
- ``watch_sigterm`` turns SIGTERM (how schedulers preempt) into ``reached_preemption(step)``; the
  trainer then saves the current step and stops (``Preempted``).

``load_encoder_weights`` starts a new run from another run's encoder only (``config.init_from``).
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from moco_jax.state import MoCoState
from moco_jax.validation import ConfigError

STATE_ITEM, META_ITEM = "state", "meta"
LEGACY_ITEM = "default"  # checkpoints written before ``meta`` existed: the state alone
META_FORMAT = 1

# Config fields that decide the shapes of the state: a checkpoint saved with other values cannot
# be resumed (``init_from`` can still take its encoder when the backbone fields agree).
STATE_FIELDS = (
    "model.backbone",
    "model.width_multiplier",
    "model.cifar_stem",
    "model.head",
    "model.dim",
    "moco.queue_size",
    "dataset.num_channels",
)
ENCODER_FIELDS = ("model.backbone", "model.width_multiplier", "model.cifar_stem")
# Fields that may change between a run and its resumption without a warning.
UNREMARKABLE_FIELDS = ("dataset.data_dir", "init_from")


class TrainingDiverged(RuntimeError):
    """The loss or the state became NaN or infinite; the last good checkpoint is left untouched."""


class Preempted(Exception):
    """SIGTERM arrived; the state of ``step`` was saved and the run stopped (rerun to resume)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class CheckpointError(RuntimeError):
    """No checkpoint in a directory can be used (all damaged), or the one asked for is damaged."""


class Checkpointer:
    """Saves every ``checkpoint.every_steps`` steps (and when forced), keeps the last few."""

    def __init__(self, directory: str | epath.Path, config: Any):
        checkpoint = config.checkpoint
        self.directory = epath.Path(directory)
        if "://" not in str(self.directory):
            self.directory = self.directory.absolute()
        self.every_steps = checkpoint.every_steps
        self.keep_every_steps = checkpoint.get("keep_every_steps", 0) or 0
        policies = [ocp.checkpoint_managers.LatestN(checkpoint.keep)]
        if self.keep_every_steps:
            policies.append(ocp.checkpoint_managers.EveryNSteps(self.keep_every_steps))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
            cleanup_tmp_directories=True,  # what a save killed half-way left behind
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=(STATE_ITEM, META_ITEM),
            item_handlers={STATE_ITEM: _state_handler(), META_ITEM: ocp.JsonCheckpointHandler()},
            options=options,
        )
        self.config = _config_dict(config)
        self.restored_step: int | None = None
        self.restored_extra: dict[str, Any] = {}
        self._sigterm = False
        self._previous_handler: Any = None
        self._closed = False

    # --- Saving. ---

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: MoCoState,
        force: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Save ``state`` (taken after ``step`` steps) if due; the write finishes asynchronously.

        ``extra``: scalars of the trainer saved with it (restored as ``restored_extra``).
        Raises ``TrainingDiverged`` (and saves nothing) if the state or an extra is not finite.
        """
        due = (self.every_steps > 0 and step % self.every_steps == 0) or (
            self.keep_every_steps > 0 and step % self.keep_every_steps == 0
        )
        latest = self.manager.latest_step()
        if not (due or force) or (latest is not None and step <= latest):
            return False
        extra = {k: v.item() if hasattr(v, "item") else v for k, v in (extra or {}).items()}
        finite, fingerprint = summarize(state)
        bad_arrays = [path for path, ok in finite.items() if not ok]
        bad_extras = {
            k: v for k, v in extra.items() if isinstance(v, float) and not math.isfinite(v)
        }
        if bad_arrays or bad_extras:
            self.close()
            found = [f"{k} = {v}" for k, v in bad_extras.items()]
            if bad_arrays:
                more = f" and {len(bad_arrays) - 3} more" if len(bad_arrays) > 3 else ""
                found.append(f"non-finite arrays: {', '.join(bad_arrays[:3])}{more}")
            raise TrainingDiverged(
                f"training diverged: NaN/inf by step {step} ({'; '.join(found)}); stopping "
                f"without saving that state (latest good checkpoint: step {latest}). Lower "
                f"optim.base_lr or check the data."
            )
        meta = {
            "format": META_FORMAT,
            "step": step,
            "config": self.config,
            "fingerprint": fingerprint,
            "extra": extra,
        }
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.PyTreeSave(state), META_ITEM: ocp.args.JsonSave(meta)}
        )
        self.manager.save(step, args=args, force=True)
        return True

    def check_can_save(self, template: MoCoState) -> None:
        """Fail before training if checkpoints cannot be written: a read-only directory, or a disk
        without room for one more checkpoint of ``template`` (an ``OSError`` naming the cause)."""
        probe = self.directory / f".write_test_{jax.process_index()}"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise OSError(
                f"checkpoint directory {self.directory} is not writable: {err.strerror or err}"
            ) from err
        needed = sum(x.size * x.dtype.itemsize for x in _array_leaves(template))
        try:
            free = shutil.disk_usage(str(self.directory)).free
        except OSError:  # not a local file system (e.g. a bucket): nothing to measure
            return
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"{self.directory} has {free / 2**20:.1f} MiB free but one checkpoint needs "
                f"about {needed / 2**20:.1f} MiB: free some space or use another --workdir",
            )

    # --- Preemption. ---

    def watch_sigterm(self) -> None:
        """From now until ``close``, SIGTERM asks the loop to save and stop (one process).

        Multi-process runs leave SIGTERM to JAX's preemption service (set up by
        ``jax.distributed.initialize``), which agrees on one step across processes.
        """
        if jax.process_count() > 1:
            return
        try:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: signals cannot be handled here
            logging.warning("not on the main thread: SIGTERM will not save a checkpoint")

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._sigterm = True
        logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping")

    def reached_preemption(self, step: int) -> bool:
        """True once the run should save ``step`` and stop (SIGTERM / preemption notice)."""
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return self._sigterm

    def stop_for_preemption(self, step: int, state: MoCoState, extra: dict[str, Any]) -> None:
        """Save ``state`` of ``step`` now, wait for the write, and raise ``Preempted``."""
        self.save(step, state, force=True, extra=extra)
        self.close()
        raise Preempted(
            f"SIGTERM: saved step {step} to {self.directory}; rerun the same command to resume",
            step,
        )

    # --- Restoring. ---

    def restore_latest(self, template: MoCoState) -> MoCoState:
        """The newest intact checkpoint laid out like ``template``, or ``template`` if none exists.

        Raises ``ConfigError`` if it was saved with a different config, and ``CheckpointError`` if
        checkpoints exist but every one is damaged. Damaged ones newer than the restored one are
        moved to ``<workdir>/checkpoints_damaged/`` with a warning.
        """
        self.restored_step, self.restored_extra = None, {}
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self._restore_verified(step, template)
            except _Damaged as err:
                damaged.append((step, str(err)))
                continue
            for bad_step, reason in damaged:
                moved_to = self._set_aside(bad_step)
                logging.warning(
                    "skipped damaged checkpoint step %d (%s); moved it to %s. Resuming from "
                    "step %d.",
                    bad_step,
                    reason,
                    moved_to,
                    step,
                )
            self.restored_step, self.restored_extra = step, (meta or {}).get("extra", {})
            return state
        if damaged:
            reasons = "; ".join(f"step {s}: {r}" for s, r in damaged)
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged ({reasons}). Move the "
                f"directory away to start from scratch."
            )
        return template

    def restore(self, step: int, template: MoCoState) -> MoCoState:
        """The state saved at ``step``, laid out like ``template`` (verified, no fallback)."""
        if step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step}; available: {list(self.manager.all_steps())}"
            )
        try:
            state, _ = self._restore_verified(step, template)
        except _Damaged as err:
            raise CheckpointError(f"checkpoint step {step} is damaged: {err}") from err
        return state

    def _restore_verified(self, step: int, template: MoCoState) -> tuple[MoCoState, dict | None]:
        """Read, check compatibility, restore and verify one step; ``_Damaged`` if unreadable."""
        step_dir = self.directory / str(step)
        legacy = (step_dir / LEGACY_ITEM).is_dir()
        meta = None
        if not legacy:
            try:
                meta = self.manager.restore(
                    step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
                )[META_ITEM]
                if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
                    raise ValueError("not a moco_jax checkpoint description")
            except Exception as err:
                raise _Damaged(f"its {META_ITEM} cannot be read: {_short(err)}") from err
            refuse_other_config(meta.get("config", {}), self.config, STATE_FIELDS, step_dir)
        try:
            saved_shapes = _saved_shapes(step_dir / (LEGACY_ITEM if legacy else STATE_ITEM))
        except Exception as err:
            raise _Damaged(f"its array metadata cannot be read: {_short(err)}") from err
        _refuse_other_shapes(saved_shapes, template, step_dir)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            if legacy:
                state = ocp.StandardCheckpointHandler().restore(
                    step_dir / LEGACY_ITEM, args=ocp.args.StandardRestore(abstract)
                )
            else:
                restore_args = ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.PyTreeRestore(
                            item=abstract,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                        )
                    }
                )
                state = self.manager.restore(step, args=restore_args)[STATE_ITEM]
        except Exception as err:
            raise _Damaged(f"its arrays cannot be read: {_short(err)}") from err
        if meta is not None:
            _, fingerprint = summarize(state)
            changed = [p for p, f in fingerprint.items() if meta["fingerprint"].get(p) != f]
            if changed:
                raise _Damaged(
                    f"{len(changed)} array(s) differ from what was saved, e.g. {changed[0]}"
                )
        return state, meta

    def _set_aside(self, step: int) -> epath.Path:
        """Move a damaged step out of the manager's directory (kept for inspection)."""
        target_root = self.directory.parent / f"{self.directory.name}_damaged"
        target = target_root / str(step)
        suffix = 1
        while target.exists():
            target, suffix = target_root / f"{step}.{suffix}", suffix + 1
        if jax.process_index() == 0:
            target_root.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"moco_jax_set_aside_{step}")
        self.manager.reload()
        return target

    def close(self) -> None:
        """Wait for the last save to be written, and give SIGTERM back its previous handler."""
        if not self._closed:
            self.manager.wait_until_finished()
            self.manager.close()
            self._closed = True
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


class _Damaged(Exception):
    """A checkpoint that cannot be read back as it was written."""


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler; on one host without replica-parallel writes.

    Replica-parallel saving splits each replicated array into one slice per device so that every
    host writes a part: on a single host it only adds a slicing op (compiled per shape) per
    device and array, which made the first save of a small model take seconds.
    """
    if jax.process_count() > 1:
        return ocp.PyTreeCheckpointHandler()
    from orbax.checkpoint._src.metadata import array_metadata_store

    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        (int, handlers.ScalarHandler()),
        (float, handlers.ScalarHandler()),
        (np.number, handlers.ScalarHandler()),
        (np.ndarray, handlers.NumpyHandler()),
        (
            jax.Array,
            handlers.ArrayHandler(
                use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()
            ),
        ),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


# --- Starting from another run's encoder (``config.init_from``). ---


def load_encoder_weights(path: str, template: MoCoState, config: Any) -> MoCoState:
    """``template`` with the query encoder of the checkpoint at ``path`` in both encoders.

    ``path`` is a workdir, its ``checkpoints`` directory (the latest intact step is used) or one
    step's directory. The backbone must have the same shapes (else ``ConfigError`` naming the
    fields); the head is taken too when its shapes agree (same ``model.head`` and ``model.dim``),
    and stays freshly initialised otherwise. Step, optimizer state, queue and RNG stay fresh.
    """
    step_dir = _find_step_dir(epath.Path(path))
    legacy = (step_dir / LEGACY_ITEM).is_dir()
    item_dir = step_dir / (LEGACY_ITEM if legacy else STATE_ITEM)
    if not legacy:
        meta = json.loads((step_dir / META_ITEM / "metadata").read_text())
        refuse_other_config(
            meta.get("config", {}), _config_dict(config), ENCODER_FIELDS, step_dir, "init_from "
        )
    tree = _saved_metadata_tree(item_dir)
    wanted = {name: tree[name] for name in ("params", "batch_stats") if name in tree}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    saved = ocp.PyTreeCheckpointHandler().restore(
        item_dir,
        args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True),
    )
    params, batch_stats = dict(template.params), dict(template.batch_stats)
    taken = []
    for part in ("backbone", "head"):
        new = {"params": params.get(part), "batch_stats": batch_stats.get(part)}
        old = {k: saved.get(k, {}).get(part) for k in new}
        problems = _shape_problems(
            _shapes({k: {part: v} for k, v in old.items()}),
            _shapes({k: {part: v} for k, v in new.items()}),
        )
        if problems and part == "backbone":
            raise ConfigError(
                f"init_from {step_dir}: the backbone's arrays differ from this config's: "
                + "; ".join(problems[:4])
            )
        if problems:
            logging.warning("init_from: head differs (%s); it starts fresh", problems[0])
            continue
        for name, target in (("params", params), ("batch_stats", batch_stats)):
            if new[name] is not None:
                target[part] = jax.tree.map(_placed_like, old[name], new[name])
        taken.append(part)
    logging.info("init_from %s: loaded the %s", step_dir, " and ".join(taken))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 - the EMA starts as a copy
    return template.replace(
        params=params,
        batch_stats=batch_stats,
        ema_params=copy(params),
        ema_batch_stats=copy(batch_stats),
    )


def _find_step_dir(path: epath.Path) -> epath.Path:
    if not path.exists():
        raise ConfigError(f"init_from: {path} does not exist")
    if (path / STATE_ITEM).is_dir() or (path / LEGACY_ITEM).is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
    if not steps:
        raise ConfigError(f"init_from: no checkpoint in {root}")
    return root / str(steps[0])


def _placed_like(saved: np.ndarray, like: jax.Array) -> jax.Array:
    """``saved`` laid out like ``like``; works when other processes own some of the devices."""
    host = np.asarray(saved, like.dtype)
    return jax.make_array_from_callback(host.shape, like.sharding, lambda index: host[index])


# --- Config and shape comparison. ---


def _config_dict(config: Any) -> dict:
    """The config as plain JSON values (tuples become lists, as in ``config.json``)."""
    return json.loads(config.to_json_best_effort())


def _get(tree: dict, dotted: str) -> Any:
    for name in dotted.split("."):
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return tree


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
    resumption is allowed.
    """
    differ = [f for f in fields if _get(saved, f) != _get(current, f)]
    if differ:
        listing = ", ".join(f"{f} {_get(saved, f)!r} -> {_get(current, f)!r}" for f in differ)
        advice = (
            "init_from needs the same backbone"
            if what
            else "Use another --workdir; to start there from this checkpoint's encoder "
            f"weights only, add --config.init_from={where}"
        )
        raise ConfigError(
            f"{what}checkpoint {where} was saved with a different config ({listing}: checkpoint "
            f"-> now). {advice}."
        )
    old, new = _flatten(saved), _flatten(current)
    others = [
        f"{f} {old.get(f)!r} -> {new.get(f)!r}"
        for f in sorted(set(old) | set(new))
        if old.get(f) != new.get(f) and f not in UNREMARKABLE_FIELDS
    ]
    if others and not what:
        logging.warning("resuming %s with changed settings: %s", where, ", ".join(others))


def _path_name(path: tuple) -> str:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def _array_leaves(tree: Any) -> list[Any]:
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(p): tuple(x.shape) for p, x in flat if hasattr(x, "shape")}


def _saved_metadata_tree(item_dir: epath.Path) -> Any:
    """The saved pytree of ``ArrayMetadata`` (shape, dtype) of one orbax item."""
    metadata = ocp.PyTreeCheckpointHandler().metadata(item_dir)
    return metadata.tree if hasattr(metadata, "tree") else metadata


def _saved_shapes(item_dir: epath.Path) -> dict[str, tuple[int, ...]]:
    return _shapes(_saved_metadata_tree(item_dir))


def _template_shapes(template: MoCoState) -> dict[str, tuple[int, ...]]:
    """Shapes as saved: PRNG keys are stored as their ``uint32`` key data."""
    keys_as_data = lambda x: (  # noqa: E731
        jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    )
    return _shapes(jax.eval_shape(lambda t: jax.tree.map(keys_as_data, t), template))


def _shape_problems(saved: dict, current: dict) -> list[str]:
    problems = [f"{p} missing in the checkpoint" for p in current if p not in saved]
    problems += [f"{p} not in this config" for p in saved if p not in current]
    problems += [
        f"{p} {list(saved[p])} (checkpoint) vs {list(current[p])} (now)"
        for p in current
        if p in saved and saved[p] != current[p]
    ]
    return problems


def _refuse_other_shapes(saved: dict, template: MoCoState, where: Any) -> None:
    problems = _shape_problems(saved, _template_shapes(template))
    if problems:
        raise ConfigError(
            f"checkpoint {where} holds a state of other shapes than this config's: "
            + "; ".join(problems[:4])
            + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
            + f". Use another --workdir; to start there from this checkpoint's encoder weights "
            f"only, add --config.init_from={where}."
        )


def _short(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


# --- Fingerprints and finiteness. ---


def _host_copy(x: jax.Array) -> np.ndarray:
    """This process's copy of a (replicated) array; PRNG keys as their key data."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # the state is replicated: every process holds all of it
    return np.ascontiguousarray(np.asarray(x))


def _leaf_summary(x: jax.Array) -> tuple[bool, list[int]]:
    array = _host_copy(x)
    finite = True
    if jnp.issubdtype(array.dtype, jnp.inexact):
        finite = bool(np.isfinite(array.astype(np.float32, copy=False)).all())
    raw = array.reshape(-1)
    size = raw.dtype.itemsize
    words = raw.view(np.uint32) if size % 4 == 0 else raw.view(f"u{size}").astype(np.uint32)
    weights = np.arange(words.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    checks = [int(words.sum(dtype=np.uint32)), int((words * weights).sum(dtype=np.uint32))]
    return finite, checks


def summarize(state: Any) -> tuple[dict[str, bool], dict[str, list[int]]]:
    """Per array: whether it is finite, and a position-weighted checksum of its bits.

    The checksum is two wrapping ``uint32`` sums of the array's 32-bit words (plain, and weighted
    by odd position factors), so any flipped bit, zeroed block or swapped pair of values changes
    it. Computed on the host from the same values orbax copies there to save them.
    """
    finite, checks = {}, {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if hasattr(x, "shape"):
            name = _path_name(path)
            finite[name], checks[name] = _leaf_summary(x)
    return finite, checks
