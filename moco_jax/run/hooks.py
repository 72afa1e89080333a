"""What the training loop does besides stepping, as periodic actions (in the style of clu's
``periodic_actions``): each hook is called after every step with the loop's ``Progress`` and
decides for itself whether it is due. The loop runs them in order; a hook may stop the run by
raising (divergence, preemption).

The profiler trace is clu's ``periodic_actions.Profile``. The others are not clu's actions: they
are due at epoch ends (from the step and the epoch length, also in a resumed run) and read and
update the shared ``Progress`` (the epoch's loss sum, the state), where a clu action gets the
step alone and triggers on a step or time period; clu's ``ReportProgress`` reports steps/s and
ETA where ``LogMetrics`` writes images/s into the metrics files, its clock restarted after each
kNN pass, and the checkpoint's policies (interval, preemption) are orbax's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from moco_jax.mesh import put_replicated
from moco_jax.run.checkpointing import Checkpointer, TrainingDiverged


@dataclasses.dataclass
class Progress:
    """The loop's position after a step, shared by the hooks (which may update it)."""

    step: int  # optimizer steps taken
    steps_per_epoch: int
    state: Any
    metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    epoch_loss: jax.Array | None = None  # loss summed over this epoch's steps so far (on device)
    epoch_steps: int = 0
    # The same over the logging window: the steps since the last step record (LogMetrics).
    window_loss: jax.Array | None = None
    window_steps: int = 0

    @property
    def epoch(self) -> int:
        """Epochs completed, counting the current one once its last step is taken."""
        return -(-self.step // self.steps_per_epoch)

    @property
    def end_of_epoch(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    def add_loss(self) -> None:
        loss = self.metrics["loss"]
        self.epoch_loss = loss if self.epoch_loss is None else self.epoch_loss + loss
        self.epoch_steps += 1
        self.window_loss = loss if self.window_loss is None else self.window_loss + loss
        self.window_steps += 1


def resumed_epoch_loss(extra: dict, step: int, steps_per_epoch: int, mesh) -> tuple[Any, int]:
    """The running (loss sum, steps) of the epoch ``step`` falls in, as saved with its checkpoint
    (kept on the mesh like the step's loss; None: nothing summed yet this epoch)."""
    return _resumed_sum(extra.get("epoch_loss_sum"), step % steps_per_epoch, mesh)


def resumed_window_loss(
    extra: dict, step: int, steps_per_epoch: int, every_steps: int, mesh
) -> tuple[Any, int]:
    """The running (loss sum, steps) of the logging window ``step`` falls in, as saved with its
    checkpoint: a window ends every ``every_steps`` steps and at each epoch's end (a checkpoint
    written before windows were saved: None, the window starts again here)."""
    start = max(step - step % every_steps, step - step % steps_per_epoch)
    return _resumed_sum(extra.get("window_loss_sum"), step - start, mesh)


def _resumed_sum(saved: float | None, steps: int, mesh) -> tuple[Any, int]:
    if saved is None or steps == 0:
        return None, 0
    return put_replicated(mesh, np.float32(saved)), steps


def check_finite(loss: float, step: int, checkpointer: Checkpointer) -> None:
    """``TrainingDiverged`` (after closing the checkpoints) when the loss is NaN or infinite."""
    if not math.isfinite(loss):
        checkpointer.close()
        raise TrainingDiverged(
            f"loss became {loss} at step {step}; stopping without saving this state "
            f"(latest good checkpoint: step {checkpointer.latest_step()}). Lower optim.base_lr "
            f"or check the data."
        )


HISTORY = "history"  # the checkpoint's extra item: the run's baselines and epoch records


class SaveCheckpoint:
    """Saves when the checkpoint policies ask for it (interval, preemption) and at every epoch's
    end, with the running epoch loss, the epoch length, the input pipeline's counters and the
    run's ``history`` so far (baselines and epoch records: small, one dict per epoch).

    Runs after the hooks that write records: everything a checkpoint covers is on disk before
    the checkpoint is, and in it, so a run killed at any moment resumes with no record missing,
    even one a kill left cut (a resumed run rebuilds the records files from its checkpoint and
    redoes the records after it: its kNN figures could not be measured again).
    """

    def __init__(self, checkpointer: Checkpointer, views: Any, history: dict):
        self.checkpointer, self.views, self.history = checkpointer, views, history

    def extra(self, progress: Progress) -> dict[str, Any]:
        loss = 0.0 if progress.epoch_steps == 0 else progress.epoch_loss
        window = 0.0 if progress.window_steps == 0 else progress.window_loss
        history = {"epochs": list(self.history.get("epochs", []))}  # a copy: saved later
        if "baselines" in self.history:
            history["baselines"] = dict(self.history["baselines"])
        return {
            "epoch_loss_sum": loss,
            "window_loss_sum": window,
            "steps_per_epoch": progress.steps_per_epoch,
            **self.views.checkpoint_extra(),
            HISTORY: history,
        }

    def __call__(self, progress: Progress) -> None:
        force = progress.end_of_epoch
        self.checkpointer.save(progress.step, progress.state, force, self.extra(progress))


class StopWhenPreempted:
    """SIGTERM (or a pod's preemption notice): save this step, then raise ``Preempted``."""

    def __init__(self, save: SaveCheckpoint, progress_bar: Any):
        self.save, self.progress_bar = save, progress_bar

    def __call__(self, progress: Progress) -> None:
        checkpointer = self.save.checkpointer
        if checkpointer.reached_preemption(progress.step):
            self.progress_bar.close()
            checkpointer.stop_for_preemption(
                progress.step, progress.state, self.save.extra(progress)
            )


class LogMetrics:
    """Every ``every_steps`` steps and at each epoch's end (the logging window): fetch the
    metrics, stop on a non-finite loss, write them, move the bar. ``loss`` is the mean over the
    window's steps (saved with each checkpoint, so a resumed run writes the same figure); the
    other metrics are the window's last step's. ``images_per_sec`` counts the window's steps
    but this process's first, which compiled the step: throughput, not compile time (a window
    of that step alone has none)."""

    def __init__(self, every_steps, batch_size, epochs, writer, progress_bar, checkpointer):
        self.every_steps, self.batch_size, self.epochs = every_steps, batch_size, epochs
        self.writer, self.progress_bar, self.checkpointer = writer, progress_bar, checkpointer
        self.window_start, self.bar_steps, self.timed_steps = time.time(), 0, 0
        self.compiled = False

    def restart_clock(self) -> None:
        self.window_start = time.time()

    def __call__(self, progress: Progress) -> None:
        self.bar_steps += 1
        if self.compiled:
            self.timed_steps += 1
        else:  # the clock starts once the first step (compiled here) has run
            jax.block_until_ready(progress.metrics)
            self.compiled = True
            self.restart_clock()
        if progress.step % self.every_steps and not progress.end_of_epoch:
            return
        metrics, window_loss = jax.device_get((progress.metrics, progress.window_loss))
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars["loss"] = float(window_loss) / progress.window_steps
        progress.window_loss, progress.window_steps = None, 0
        check_finite(scalars["loss"], progress.step, self.checkpointer)
        shown = {"epoch": f"{progress.epoch}/{self.epochs}", "loss": f"{scalars['loss']:.3f}"}
        if self.timed_steps:
            elapsed = max(time.time() - self.window_start, 1e-9)
            scalars["images_per_sec"] = self.timed_steps * self.batch_size / elapsed
            shown["img_s"] = f"{scalars['images_per_sec']:.0f}"
        self.writer.write_step(progress.step, scalars)
        self.progress_bar.set_postfix(**shown)
        self.progress_bar.update(self.bar_steps)
        self.window_start, self.bar_steps, self.timed_steps = time.time(), 0, 0


class EndOfEpoch:
    """At each epoch's end: the epoch's mean loss, the evaluation when due (kNN, or the linear
    classifier's test accuracy), one record written and shown."""

    def __init__(self, epochs, every_epochs, evaluate, counters, writer, history, log, ckpt):
        self.epochs, self.every_epochs, self.evaluate = epochs, every_epochs, evaluate
        self.counters = counters  # () -> the input pipeline's counters (e.g. skipped images)
        self.writer, self.history, self.log, self.checkpointer = writer, history, log, ckpt

    def __call__(self, progress: Progress) -> None:
        if not progress.end_of_epoch:
            return
        epoch = progress.epoch
        record = {"epoch": epoch, "loss": float(progress.epoch_loss) / progress.epoch_steps}
        record.update(self.counters())
        check_finite(record["loss"], progress.step, self.checkpointer)
        if epoch % self.every_epochs == 0 or epoch == self.epochs:
            t0 = time.time()
            record.update(self.evaluate(progress.state))
            record["eval_seconds" if "test_top1" in record else "knn_seconds"] = time.time() - t0
        self.writer.write_epoch(record)
        self.history.setdefault("epochs", []).append(record)
        self.log(describe_epoch(record))
        progress.epoch_loss, progress.epoch_steps = None, 0


class Profile:
    """A ``jax.profiler`` trace of the ``num_steps`` steps after step ``first_step`` (each
    process its own), written under ``logdir`` for TensorBoard's profile tab or Perfetto: clu's
    ``periodic_actions.Profile``, taken once. The trace is written when it stops, so it stops
    at the run's last step at the latest (a run preempted or diverged while tracing leaves none).
    Off (nothing imported) when ``num_steps`` is 0 or the run ends by ``first_step``.
    """

    def __init__(self, logdir: epath.Path, first_step: int, num_steps: int, last_step: int):
        num_steps = min(num_steps, last_step - first_step)
        self.action = None
        if num_steps > 0:
            from clu import periodic_actions

            self.action = periodic_actions.Profile(
                logdir=logdir, num_profile_steps=num_steps, profile_duration_ms=None,
                first_profile=first_step, every_steps=None, every_secs=None,
            )  # fmt: skip

    def __call__(self, progress: Progress) -> None:
        if self.action is not None:
            self.action(progress.step)


def describe_epoch(record: dict) -> str:
    text = f"epoch {record['epoch']}: loss {record['loss']:.4f}"
    if "knn_head" in record:
        text += f", kNN top-1 head {record['knn_head']:.2f}% backbone {record['knn_backbone']:.2f}%"
    if "test_top1" in record:
        text += f", test top-1 {record['test_top1']:.2f}% top-5 {record['test_top5']:.2f}%"
    return text
