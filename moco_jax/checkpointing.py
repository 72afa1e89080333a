"""Orbax checkpoints of the whole ``MoCoState`` (the input position is ``state.step``)."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from moco_jax.state import MoCoState


class Checkpointer:
    """Saves every ``checkpoint.every_steps`` steps (and when forced), keeps the last few."""

    def __init__(self, directory: pathlib.Path, config: Any):
        self.every_steps = config.checkpoint.every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, template: MoCoState) -> MoCoState:
        """The latest saved state laid out like ``template``, or ``template`` if none exists."""
        step = self.manager.latest_step()
        return template if step is None else self.restore(step, template)

    def restore(self, step: int, template: MoCoState) -> MoCoState:
        """The state saved at ``step``, laid out like ``template``."""
        if step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step}; available: {list(self.manager.all_steps())}"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def save(self, step: int, state: MoCoState, force: bool = False) -> None:
        """Save ``state`` (taken after ``step`` steps) if due; the write finishes asynchronously."""
        due = self.every_steps > 0 and step % self.every_steps == 0
        if (due or force) and step != self.manager.latest_step():
            self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
