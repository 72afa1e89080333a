"""Fault injection for the preemption, divergence and disk-full tests: periodic actions that
``install`` adds to every training loop of this process (``trainer.INSTALLED_ACTIONS``), each
off unless an environment variable asks. A test that runs a command line with a fault runs it
through ``with_faults.py``, which installs them first; the library never calls this file.

Each variable names a step count ``N`` (the state after ``N`` optimizer steps):

- ``MOCO_JAX_FAULT_KILL_AT_STEP=N``: SIGKILL this process right after step ``N`` (and its
  checkpoint save, if one was due, has started): a machine that vanishes mid-run.
- ``MOCO_JAX_FAULT_KILL_AFTER_COMMIT_AT_STEP=N``: the same, but only once step ``N``'s checkpoint
  is completely written: the moment between a committed checkpoint and what follows it.
- ``MOCO_JAX_FAULT_SIGTERM_AT_STEP=N``: send this process SIGTERM after step ``N``, as a
  scheduler preempting the job would.
- ``MOCO_JAX_FAULT_FILL_DISK_AT_STEP=N``: right after step ``N``'s checkpoint save has started
  (orbax writes it in the background), fill the workdir's file system with one file,
  ``<workdir>/fault_disk_filler``: a disk that fills during an asynchronous write.
- ``MOCO_JAX_FAULT_NAN_AT_STEP=N``: step ``N``'s loss becomes NaN and the parameters it produces
  are poisoned, as a diverging step would leave them.

Nothing here changes a run when the variables are unset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _step_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


@dataclasses.dataclass(frozen=True)
class Faults:
    kill_at: int | None = None
    kill_after_commit_at: int | None = None
    sigterm_at: int | None = None
    nan_at: int | None = None
    fill_disk_at: int | None = None
    wait_for_saves: Callable[[], None] = lambda: None
    disk_filler: str = "fault_disk_filler"

    @classmethod
    def from_env(cls, wait_for_saves: Callable[[], None], workdir: str = ".") -> Faults:
        """The faults the environment asks for; ``wait_for_saves`` blocks until checkpoints
        started so far are written; ``workdir`` is where the disk filler goes."""
        return cls(
            kill_at=_step_from_env("MOCO_JAX_FAULT_KILL_AT_STEP"),
            kill_after_commit_at=_step_from_env("MOCO_JAX_FAULT_KILL_AFTER_COMMIT_AT_STEP"),
            sigterm_at=_step_from_env("MOCO_JAX_FAULT_SIGTERM_AT_STEP"),
            nan_at=_step_from_env("MOCO_JAX_FAULT_NAN_AT_STEP"),
            fill_disk_at=_step_from_env("MOCO_JAX_FAULT_FILL_DISK_AT_STEP"),
            wait_for_saves=wait_for_saves,
            disk_filler=os.path.join(str(workdir), "fault_disk_filler"),
        )

    def actions(self) -> tuple[list, list]:
        """The actions to run first after each step, and last (after its checkpoint save)."""
        return [self.poison], [self.fill_disk, self.deliver_signals]

    def poison(self, progress) -> None:
        """Hook: the step's loss and parameters become NaN if the step is ``nan_at``."""
        if progress.step != self.nan_at:
            return
        poison = lambda x: x * jnp.nan
        progress.metrics = {**progress.metrics, "loss": poison(progress.metrics["loss"])}
        progress.state = progress.state.replace(params=jax.tree.map(poison, progress.state.params))

    def fill_disk(self, progress) -> None:
        """Hook (after the checkpoint hook): at ``fill_disk_at``, write zeros until the disk is
        full, while the step's checkpoint is being written."""
        if progress.step != self.fill_disk_at:
            return
        filler = os.open(self.disk_filler, os.O_WRONLY | os.O_CREAT)
        try:
            with contextlib.suppress(OSError):  # ENOSPC: full
                while True:
                    os.write(filler, bytes(1 << 16))
        finally:
            os.close(filler)

    def deliver_signals(self, progress) -> None:
        """Hook (after the checkpoint hook): the signal asked for at this step, if any."""
        if progress.step == self.kill_after_commit_at:
            self.wait_for_saves()
        if progress.step in (self.kill_at, self.kill_after_commit_at):
            os.kill(os.getpid(), signal.SIGKILL)
        if progress.step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)


def install() -> None:
    """Every training loop of this process runs the faults its environment asks for."""
    from moco_jax.run import trainer

    def actions(run) -> tuple[list, list]:
        return Faults.from_env(run.checkpointer.manager.wait_until_finished, run.workdir).actions()

    trainer.INSTALLED_ACTIONS.append(actions)
