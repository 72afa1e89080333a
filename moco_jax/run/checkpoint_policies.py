"""When a run saves and what it keeps: orbax's policies, and two guards for a damaged checkpoint
that cannot be moved out of the way (a step directory without permissions, say).

- ``checkpoint.keep`` counts the readable checkpoints only. A damaged step left in place (the
  ``Checkpointer`` could not move it to ``checkpoints_damaged/``) is neither counted nor deleted by
  the run that found it: the checkpoint the run resumed from stays until ``keep`` newer ones are
  written, however new the unreadable step is.
- A step that retention cannot delete stays where it is with a warning. Orbax deletes in its
  background thread and would raise the failure at the next save, stopping the run (and every
  rerun one checkpoint later).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

policies = ocp.checkpoint_managers


class SignalPolicy(policies.SaveDecisionPolicy):
    """Save when this process received SIGTERM (single-process runs; several processes agree on a
    step through JAX's preemption service and ``PreemptionCheckpointingPolicy`` instead)."""

    def __init__(self):
        self.received = False

    def should_save(self, step, previous_steps, *, context) -> bool:
        del step, previous_steps, context
        return self.received


@dataclasses.dataclass
class SkipUnreadable(policies.PreservationPolicy):
    """``policy`` applied to the checkpoints not in ``unreadable``; those are all preserved."""

    policy: Any
    unreadable: set[int]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        readable = [c for c in checkpoints if c.step not in self.unreadable]
        verdicts = iter(self.policy.should_preserve(readable, context=context))
        return [c.step in self.unreadable or next(verdicts) for c in checkpoints]


def manager_options(
    checkpoint: Any, signal: SignalPolicy, unreadable: set[int]
) -> ocp.CheckpointManagerOptions:
    """Orbax's options for ``config.checkpoint``: save at its intervals, on SIGTERM and on a
    preemption notice; keep the latest ``keep`` readable steps (and every ``keep_every_steps``-th)
    and every step in ``unreadable`` (a set the caller fills as it finds them)."""
    save = [policies.PreemptionCheckpointingPolicy(), signal]
    keep = [policies.LatestN(checkpoint.keep)]
    if checkpoint.every_steps:
        save.append(policies.FixedIntervalPolicy(checkpoint.every_steps))
    if checkpoint.keep_every_steps:
        save.append(policies.FixedIntervalPolicy(checkpoint.keep_every_steps))
        keep.append(policies.EveryNSteps(checkpoint.keep_every_steps))
    return ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(save),
        preservation_policy=SkipUnreadable(policies.AnyPreservationPolicy(keep), unreadable),
        create=True,
        cleanup_tmp_directories=True,  # what a save killed half-way left behind
        enable_async_checkpointing=True,
    )


class DeleteOrWarn:
    """Orbax's checkpoint deleter, except that a step it cannot delete is a warning."""

    def __init__(self, deleter: Any):
        self.deleter = deleter

    def delete(self, step: int) -> None:
        try:
            self.deleter.delete(step)
        except OSError as err:
            logging.warning(
                "could not delete old checkpoint step %d (%s: %s); it stays in place. Remove it "
                "by hand once it can be.",
                step,
                type(err).__name__,
                err,
            )

    def delete_steps(self, steps: Sequence[int]) -> None:
        for step in steps:
            self.delete(step)

    def close(self) -> None:
        self.deleter.close()


def warn_instead_of_failing_deletes(manager: ocp.CheckpointManager) -> None:
    """Make ``manager``'s retention leave a step it cannot delete in place with a warning (its
    deleter is orbax-private: a version without one keeps orbax's behaviour)."""
    deleter = getattr(manager, "_checkpoint_deleter", None)
    if deleter is not None and hasattr(deleter, "delete_steps"):
        manager._checkpoint_deleter = DeleteOrWarn(deleter)
