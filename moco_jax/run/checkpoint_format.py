"""The on-disk layout of a checkpoint step, and reading every format this project has written.

Format 2 (now): items ``state`` (the state pytree, PRNG keys as their key data) and ``extra``
(JSON), with the run's config and the arrays' checksums in the step's orbax ``custom_metadata``.
Format 1: ``state`` and a ``meta`` JSON item holding config, checksums and extra. Format 0: a lone
``default`` item (the state; no config, no checksums). Everything goes through orbax's
``CheckpointManager`` (``item_metadata``, ``metadata``, ``restore``), never through file paths.

Reading one step verified (``read_description``, then ``read_verified``) is shared by a run's
own restore (``checkpointing.py``) and by the read-only readers of another run's checkpoints
(``saved_run.py``: export, ``evaluate``, ``init_from``): a step whose description or arrays cannot
be read, or whose arrays no longer match their checksums, raises ``Damaged``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moco_jax.run import fingerprint

STATE_ITEM, EXTRA_ITEM = "state", "extra"
META_ITEM, LEGACY_ITEM = "meta", "default"  # earlier formats (read only)
FORMAT = 2


class Damaged(Exception):
    """A checkpoint that cannot be read back as it was written."""


class CheckpointError(RuntimeError):
    """No checkpoint in a directory can be used (all damaged), or the one asked for is damaged."""


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """Orbax handlers of every item this project has written."""
    return {
        STATE_ITEM: _state_handler(),
        EXTRA_ITEM: ocp.JsonCheckpointHandler(),
        META_ITEM: ocp.JsonCheckpointHandler(),
        LEGACY_ITEM: ocp.PyTreeCheckpointHandler(),
    }


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler; in a single process without replica-parallel writes.

    Replica-parallel saving splits each replicated array into one slice per device so that every
    host writes a part. With one host there is nothing to share, and the slicing ops it compiles
    made the first save of a small state take 5.0 s instead of 0.3 s (ResNet-18 at width 16 on 8
    CPU devices). Several processes keep orbax's default handler. PRNG keys are stored as their
    key data either way (``keys_as_data``), so both handlers read every checkpoint.
    """
    if jax.process_count() > 1:
        return ocp.PyTreeCheckpointHandler()
    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        (int, handlers.ScalarHandler()),
        (float, handlers.ScalarHandler()),
        (np.number, handlers.ScalarHandler()),
        (np.ndarray, handlers.NumpyHandler()),
        (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def open_manager(directory: epath.Path, options=None) -> ocp.CheckpointManager:
    """A manager of ``directory`` that reads every format (read-only unless ``options``)."""
    options = options or ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(directory, item_handlers=item_handlers(), options=options)


def read_meta(manager: ocp.CheckpointManager, step: int) -> tuple[set[str], dict | None]:
    """The items of ``step`` and its description: the saved ``config`` and ``fingerprint`` (and,
    in the previous format, ``extra``); None for the oldest format, which saved neither."""
    present = set(manager.item_metadata(step).keys())
    if LEGACY_ITEM in present:
        return present, None
    if META_ITEM in present:  # format 1: config, fingerprint and extra in a JSON item
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta[META_ITEM]
        if not isinstance(meta, dict) or meta.get("format") != 1:
            raise ValueError("not a moco_jax checkpoint description")
        return present, meta
    meta = manager.metadata(step).custom_metadata or {}
    if meta.get("format") != FORMAT:
        raise ValueError("not a moco_jax checkpoint description")
    return present, meta


def read_state(manager: ocp.CheckpointManager, step: int, abstract: Any, present: set[str]):
    """``(state, extra)`` of ``step`` laid out like ``abstract`` (a part of the saved tree is
    fine: numpy leaves are read as numpy), in any format."""
    if LEGACY_ITEM in present:
        state = manager.restore(step, args=ocp.args.Composite(default=_restore_args(abstract)))
        return state[LEGACY_ITEM], {}
    args = {STATE_ITEM: _restore_args(abstract)}
    if EXTRA_ITEM in present:
        args[EXTRA_ITEM] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return restored[STATE_ITEM], (restored[EXTRA_ITEM] if EXTRA_ITEM in present else None)


def _restore_args(abstract: Any) -> ocp.args.CheckpointArgs:
    """Restore ``abstract`` (arrays laid out as given; numpy leaves: read as numpy, partially)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)


def read_description(
    manager: ocp.CheckpointManager, step: int
) -> tuple[set[str], dict | None, Any]:
    """``read_meta`` of ``step`` and the saved state's array metadata (a tree: shapes, dtypes);
    ``Damaged`` if they cannot be read."""
    try:
        present, meta = read_meta(manager, step)
        saved = manager.item_metadata(step)[LEGACY_ITEM if LEGACY_ITEM in present else STATE_ITEM]
        saved = saved.tree if hasattr(saved, "tree") else saved
        if not fingerprint.shapes(saved):
            raise ValueError("no array metadata")
    except Exception as err:
        raise Damaged(f"its metadata cannot be read: {short_error(err)}") from err
    return present, meta, saved


def read_verified(
    manager: ocp.CheckpointManager, step: int, abstract: Any, present: set[str], meta: dict | None
) -> tuple[Any, dict]:
    """``(arrays, extra)`` of ``step`` laid out like ``abstract`` (all of the saved state, or a
    part: then only that part is read and verified), each array checked against the checksum
    saved with it (``meta``, from ``read_description``); ``Damaged`` if they cannot be read or
    differ. PRNG keys come back as their key data."""
    try:
        arrays, extra = read_state(manager, step, abstract, present)
    except Exception as err:
        raise Damaged(f"its arrays cannot be read: {short_error(err)}") from err
    if meta is None:  # the oldest format saved no checksums
        return arrays, {}
    _, checksums = fingerprint.summarize(arrays)
    changed = [p for p, c in checksums.items() if meta["fingerprint"].get(p) != c]
    if changed:
        raise Damaged(f"{len(changed)} array(s) differ from what was saved, e.g. {changed[0]}")
    return arrays, meta.get("extra", {}) if extra is None else extra


def short_error(err: Exception) -> str:
    """An exception as one line of at most 200 characters (TensorStore's run to pages)."""
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."
