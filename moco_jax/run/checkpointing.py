"""Orbax checkpoints of the whole training state, made to survive preemption, damage and mistakes.

One ``orbax.checkpoint.CheckpointManager`` decides everything it can:

- when to save: its save-decision policies, a fixed interval (``checkpoint.every_steps``, and
  ``checkpoint.keep_every_steps``) or a preemption (JAX's preemption sync point across processes;
  SIGTERM in a single process). The trainer also forces a save at every epoch's end.
- what to keep: its preservation policies, the latest ``checkpoint.keep`` plus every multiple of
  ``checkpoint.keep_every_steps`` (``checkpoint_policies.py``: a damaged step that cannot be moved
  away is not counted, and one that cannot be deleted is a warning).
- how to write: asynchronously (the device-to-host copy blocks, the write does not) and
  atomically (a temporary directory renamed when complete; leftovers of a killed save are removed
  on the next start).

Each ``<workdir>/checkpoints/<step>/`` holds two items, ``state`` (the state pytree) and ``extra``
(JSON: the trainer's and the input pipeline's running scalars, e.g. the epoch's loss sum, and the
run's records, ``hooks.SaveCheckpoint``), and the step's ``custom_metadata``: the run's config
and a checksum of every array (``fingerprint.py``).
The input position is ``state.step``: the data order is a pure function of ``(seed, step)``.

What we add on top of orbax:

- a state with a NaN or infinity is never saved (``TrainingDiverged``);
- restoring tries checkpoints newest first; one that cannot be read or whose arrays no longer
  match their checksums is moved to ``<workdir>/checkpoints_damaged/`` with a warning;
- one saved with a config of other state shapes is refused (``ConfigError`` naming the fields).

The layout, and how checkpoints of earlier versions are read, is ``checkpoint_format.py``.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import signal
from collections.abc import Iterator
from math import isfinite
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from moco_jax.config.compatibility import (
    SCHEDULE_FIELDS,
    SOURCE_FIELDS,
    STATE_FIELDS,
    config_dict,
    refuse_other_config,
    refuse_other_shapes,
)
from moco_jax.run import fingerprint
from moco_jax.run.checkpoint_format import (
    EXTRA_ITEM,
    FORMAT,
    STATE_ITEM,
    CheckpointError,
    Damaged,
    open_manager,
    read_description,
    read_verified,
    short_error,
)
from moco_jax.run.checkpoint_policies import (
    SignalPolicy,
    manager_options,
    warn_instead_of_failing_deletes,
)
from moco_jax.run.saved_run import newest_intact
from moco_jax.storage import is_remote, probe_writable

RESUME_FIELDS = STATE_FIELDS + SCHEDULE_FIELDS + SOURCE_FIELDS  # a resumed run must keep these


class TrainingDiverged(RuntimeError):
    """The loss or the state became NaN or infinite; the last good checkpoint is left untouched."""


class Preempted(Exception):
    """SIGTERM arrived; the state of ``step`` was saved and the run stopped (rerun to resume)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Checkpointer:
    """Saves when orbax's policies say so (and when forced), keeps what they preserve."""

    def __init__(self, directory: str | epath.Path, config: Any, read_only: bool = False):
        """``read_only``: the checkpoints of another run, which may be training (export,
        ``evaluate knn``): nothing is saved, cleaned up or moved; damaged checkpoints are skipped
        with a warning, and ones that run deletes while they are read are not taken for damage."""
        checkpoint = config.checkpoint
        self.keep = checkpoint.keep
        self.directory = epath.Path(directory)
        if not is_remote(self.directory):
            self.directory = self.directory.absolute()
        self.signal_policy = SignalPolicy()
        self.unreadable: set[int] = set()  # damaged steps left in place: retention skips them
        options = manager_options(checkpoint, self.signal_policy, self.unreadable)
        self.read_only = read_only
        self.manager = open_manager(self.directory, None if read_only else options)
        if not read_only:
            warn_instead_of_failing_deletes(self.manager)
        self.config = config_dict(config)
        self._bytes = 0  # of the last checkpoint saved
        self.restored_step: int | None = None
        self.restored_extra: dict[str, Any] = {}
        self._previous_handler: Any = None
        self._closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    # --- Saving. ---

    def save(self, step: int, state: Any, force: bool = False, extra: dict | None = None) -> bool:
        """Save ``state`` (taken after ``step`` steps) if a policy asks for it or ``force``.

        ``extra``: JSON saved beside it (restored as ``restored_extra``): scalars, and lists and
        dicts of them (the run's records). The write finishes asynchronously. Raises
        ``TrainingDiverged`` (saving nothing) if the state or a number in extra is not finite.
        """
        latest = self.manager.latest_step()
        if latest is not None and step <= latest:
            return False
        if not (force or self.manager.should_save(step)):
            return False
        extra = {k: v.item() if hasattr(v, "item") else v for k, v in (extra or {}).items()}
        finite, checksums = fingerprint.summarize(state)
        leaves = jax.tree_util.tree_leaves_with_path(extra)  # e.g. history.epochs.0.loss
        name = lambda path: jax.tree_util.keystr(path, simple=True, separator=".")
        bad = [f"{name(p)} = {v}" for p, v in leaves if isinstance(v, float) and not isfinite(v)]
        bad_arrays = [path for path, ok in finite.items() if not ok]
        if bad_arrays:
            more = f" and {len(bad_arrays) - 3} more" if len(bad_arrays) > 3 else ""
            bad.append(f"non-finite arrays: {', '.join(bad_arrays[:3])}{more}")
        if bad:
            self.close()
            raise TrainingDiverged(
                f"training diverged: NaN/inf by step {step} ({'; '.join(bad)}); stopping "
                f"without saving that state (latest good checkpoint: step {latest}). Lower "
                f"optim.base_lr or check the data."
            )
        saved = ocp.args.PyTreeSave(fingerprint.keys_as_data(state))
        items = {STATE_ITEM: saved, EXTRA_ITEM: ocp.args.JsonSave(extra)}
        metadata = {"format": FORMAT, "config": self.config, "fingerprint": checksums}
        self._bytes = sum(x.size * x.dtype.itemsize for x in _arrays(state))
        with self._no_space_means_one_line():  # also reports a previous save's failed write
            self.manager.save(
                step, args=ocp.args.Composite(**items), custom_metadata=metadata, force=True
            )
        return True

    @contextlib.contextmanager
    def _no_space_means_one_line(self) -> Iterator[None]:
        """A full disk while writing: say how much the run needs; the checkpoints before the
        failed one are intact (orbax commits a step only once it is whole)."""
        try:
            yield
        except Exception as err:  # OSError from orbax, ValueError from TensorStore
            if getattr(err, "errno", None) != errno.ENOSPC and "No space left" not in str(err):
                raise
            raise OSError(
                errno.ENOSPC,
                f"no space left on device in {self.directory} while writing a checkpoint: one "
                f"needs about {self._bytes / 2**20:.1f} MiB and the run keeps up to "
                f"{self.keep + 1} at once. The checkpoints before it are intact: free some space "
                f"and rerun the same command to resume",
            ) from None

    def check_can_save(self, template: Any) -> None:
        """Fail before training if checkpoints cannot be written: a read-only directory, or a disk
        without room for one more checkpoint of ``template`` (an ``OSError`` naming the cause)."""
        try:
            probe_writable(self.directory)
        except OSError as err:
            raise OSError(
                f"checkpoint directory {self.directory} is not writable: {err.strerror or err}"
            ) from err
        one = sum(x.size * x.dtype.itemsize for x in _arrays(template))
        at_once = self.keep + 1  # the kept ones and the one being written
        try:
            free = shutil.disk_usage(str(self.directory)).free
        except OSError:  # not a local file system (e.g. a bucket): nothing to measure
            return
        if free < one * at_once:
            raise OSError(
                errno.ENOSPC,
                f"{self.directory} has {free / 2**20:.1f} MiB free but one checkpoint needs "
                f"about {one / 2**20:.1f} MiB and the run keeps up to {at_once} at once "
                f"(checkpoint.keep={self.keep}, plus one being written): "
                f"{one * at_once / 2**20:.1f} MiB. Free some space, lower checkpoint.keep or use "
                f"another --workdir",
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
        self.signal_policy.received = True
        logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping")

    def reached_preemption(self, step: int) -> bool:
        """True once the run should save ``step`` and stop (SIGTERM / preemption notice)."""
        return self.signal_policy.received or self.manager.reached_preemption(step)

    def stop_for_preemption(self, step: int, state: Any, extra: dict[str, Any]) -> None:
        """Save ``state`` of ``step`` now, wait for the write, and raise ``Preempted``."""
        self.save(step, state, force=True, extra=extra)
        self.close()
        raise Preempted(
            f"SIGTERM: saved step {step} to {self.directory}; rerun the same command to resume",
            step,
        )

    # --- Restoring. ---

    def restore_latest(self, template: Any, steps: list[int] | None = None) -> Any:
        """The newest intact checkpoint (of ``steps``, default all) laid out like ``template``, or
        ``template`` if none exists.

        Raises ``ConfigError`` if it was saved with a different config, and ``CheckpointError`` if
        checkpoints exist but every one is damaged. Damaged ones newer than the restored one are
        moved to ``<workdir>/checkpoints_damaged/`` with a warning; read-only, another run's
        checkpoints are read as ``saved_run.newest_intact`` reads them (nothing moved).
        """
        self.restored_step, self.restored_extra = None, {}
        if self.read_only:
            read = lambda step: self._restore_verified(step, template)
            found = newest_intact(self.manager, read, steps)
            if found is None:
                return template
            self.restored_step, (state, self.restored_extra) = found
            return state
        damaged: list[tuple[int, str]] = []
        steps = self.manager.all_steps() if steps is None else steps
        for step in sorted(steps, reverse=True):
            try:
                state, extra = self._restore_verified(step, template)
            except Damaged as err:
                damaged.append((step, str(err)))
                continue
            for bad_step, reason in damaged:
                logging.warning(
                    "skipped damaged checkpoint step %d (%s); %s. Resuming from step %d.",
                    bad_step,
                    reason,
                    self._set_aside(bad_step),
                    step,
                )
            self.restored_step, self.restored_extra = step, extra
            return state
        if damaged:
            reasons = "; ".join(f"step {s}: {r}" for s, r in damaged)
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged ({reasons}). Move the "
                f"directory away to start from scratch."
            )
        return template

    def restore(self, step: int, template: Any) -> Any:
        """The state saved at ``step``, laid out like ``template`` (verified, no fallback)."""
        if step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step}; available: {list(self.manager.all_steps())}"
            )
        try:
            return self._restore_verified(step, template)[0]
        except Damaged as err:
            raise CheckpointError(f"checkpoint step {step} is damaged: {err}") from err

    def _restore_verified(self, step: int, template: Any) -> tuple[Any, dict]:
        """Check compatibility, restore and verify one step; ``Damaged`` if it is unreadable."""
        where = self.directory / str(step)
        present, meta, saved = read_description(self.manager, step)
        if meta is not None:
            refuse_other_config(meta.get("config", {}), self.config, RESUME_FIELDS, where)
        refuse_other_shapes(fingerprint.shapes(saved), template, where)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fingerprint.keys_as_data(template))
        state, extra = read_verified(self.manager, step, abstract, present, meta)
        return fingerprint.data_as_keys(state, template), extra

    def _set_aside(self, step: int) -> str:
        """Move a damaged step out of the manager's directory (kept for inspection); says where."""
        target_root = self.directory.parent / f"{self.directory.name}_damaged"
        target = target_root / str(step)
        suffix = 1
        while target.exists():
            target, suffix = target_root / f"{step}.{suffix}", suffix + 1
        where = f"moved it to {target}"
        if jax.process_index() == 0:
            try:
                target_root.mkdir(parents=True, exist_ok=True)
                (self.directory / str(step)).rename(target)
            except OSError as err:  # e.g. a directory without permissions cannot be moved
                where = f"it stays in place: it cannot be moved ({short_error(err)})"
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"moco_jax_set_aside_{step}")
        self.manager.reload()
        if step in self.manager.all_steps():  # the same answer on every process
            self.unreadable.add(step)
        return where

    def close(self) -> None:
        """Wait for the last save to be written, and give SIGTERM back its previous handler."""
        if not self._closed:
            self._closed = True
            with self._no_space_means_one_line():
                try:
                    self.manager.wait_until_finished()
                finally:
                    self.manager.close()  # joins orbax's threads even when a write failed
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


def _arrays(tree: Any) -> list[Any]:
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
