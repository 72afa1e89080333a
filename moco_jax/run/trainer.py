"""The pretraining loop: set-up, baselines, the steps with their periodic actions, the results.

Side effects (data loading, logging, checkpoints, plots) live here and in ``hooks.py``; the step
itself is the algorithm's pure ``train_step``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import jax
from absl import logging

from moco_jax.config.batch_rules import queue_warnings
from moco_jax.interop.init_from import load_encoder_weights
from moco_jax.run import hooks, show
from moco_jax.run.checkpointing import TrainingDiverged
from moco_jax.run.metrics_io import MetricsWriter, plot_history, write_atomically
from moco_jax.run.run_setup import Run, setup_run
from moco_jax.run.startup import Startup, baselines_wanted, data_line

COMPILE_LINE = "the training step, compiled at the first step (timed with that step)"

__all__ = ["INSTALLED_ACTIONS", "TrainingDiverged", "train_and_evaluate", "train_loop"]

# Periodic actions added to every training loop of this process (tests install their fault
# injection here: tests/faults.py). Each is called with the run and returns the actions to run
# first after each step (before its records) and last (after its checkpoint save has started).
INSTALLED_ACTIONS: list[Callable[[Run], tuple[list, list]]] = []


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Pretrain as ``config`` says, writing everything under ``workdir``.

    Rerunning with the same ``workdir`` resumes from its latest checkpoint, exactly: the data
    order is a function of the step, and the running epoch loss is saved with the state. SIGTERM
    saves the current step and raises ``Preempted``; a NaN/inf loss or state raises
    ``TrainingDiverged`` and is never saved.
    Returns the final summary (last epoch's loss, kNN top-1 and the baselines).
    """
    startup = Startup(enabled=jax.process_index() == 0)
    with startup.phase("data", data_line(config)):
        run = setup_run(config, workdir)  # mesh, data, algorithm, state (fresh, restored, ...)
    # Once a run, training only (not export, evaluate), and after set-up: a run refused there
    # ends with its one error line.
    for warning in queue_warnings(config):
        logging.warning("%s", warning)
    try:
        history, state = train_loop(run, startup)
        summary = _summary(history)  # the results: summary and plots
        if jax.process_index() == 0:
            plot_history(history, run.workdir / "pretraining.png", config.dataset.name)
            write_atomically(run.workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
        show.write_at_end(run, state)  # neighbours.png, embedding.png (config.show)
    finally:
        run.close()  # waits for the last checkpoint, then lets the next run in
    return summary


def train_loop(run: Run, startup: Startup | None = None) -> tuple[dict, Any]:
    """The loop of every run (pretraining, linear evaluation): one step, then each periodic
    action in order; ``run.evaluate`` and ``run.monitor`` say what is measured. ``startup``
    gets the baselines and compile phases (default: silent). Returns the run's history and its
    final state."""
    startup = startup or Startup(enabled=False)
    config, algorithm = run.config, run.setup.algorithm
    checkpointer, views = run.checkpointer, run.train_views
    steps_per_epoch = views.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    is_main = jax.process_index() == 0
    writer = MetricsWriter(run.workdir, enabled=is_main)
    saved = checkpointer.restored_extra.get(hooks.HISTORY)  # None: fresh, or an earlier version
    history = writer.resume(int(run.state.step), steps_per_epoch, saved)
    if is_main:
        write_atomically(run.workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
    if run.monitor is not None:  # what pretraining has to beat
        _baselines_phase(run, history, writer, startup)

    progress = hooks.Progress(int(run.state.step), steps_per_epoch, run.state)
    progress.epoch_loss, progress.epoch_steps = hooks.resumed_epoch_loss(
        checkpointer.restored_extra, progress.step, steps_per_epoch, run.setup.mesh
    )
    progress.window_loss, progress.window_steps = hooks.resumed_window_loss(
        checkpointer.restored_extra,
        progress.step,
        steps_per_epoch,
        config.log_every_steps,
        run.setup.mesh,
    )
    views.restore(checkpointer.restored_extra)  # e.g. streamed data's skipped-image count
    bar = _progress_bar(total_steps, progress.step, enabled=is_main)
    first, last = _installed_actions(run)
    save = hooks.SaveCheckpoint(checkpointer, views, history)
    log = hooks.LogMetrics(
        config.log_every_steps, config.batch_size, config.epochs, writer, bar, checkpointer
    )
    end_of_epoch = hooks.EndOfEpoch(
        config.epochs, run.eval_every_epochs, run.evaluate, views.counters,
        writer, history, bar.write, checkpointer,
    )  # fmt: skip
    profile = hooks.Profile(
        run.workdir / "profile", config.profile_first_step, config.profile_steps, total_steps
    )
    # Records first, then the checkpoint that covers them (see hooks.SaveCheckpoint).
    actions = [
        *first,
        profile,
        hooks.Progress.add_loss,
        log,
        end_of_epoch,
        save,
        *last,
        hooks.StopWhenPreempted(save, bar),
    ]
    checkpointer.watch_sigterm()
    first_step = progress.step
    for step in range(progress.step, total_steps):
        compiling = startup.phase("compile", COMPILE_LINE) if step == first_step else nullcontext()
        with compiling, jax.transfer_guard("disallow"):  # nothing sent implicitly host<->device
            progress.state, progress.metrics = algorithm.train_step(progress.state, *views(step))
            if step == first_step:
                jax.block_until_ready(progress.metrics)
        if step == first_step:
            startup.done()
        progress.step = step + 1
        for action in actions:
            action(progress)
        if progress.end_of_epoch:
            log.restart_clock()  # kNN time is not training time
    bar.close()
    return history, progress.state


def _installed_actions(run: Run) -> tuple[list, list]:
    """The ``INSTALLED_ACTIONS`` for ``run``: those to run first, and those to run last."""
    first, last = [], []
    for make in INSTALLED_ACTIONS:
        before, after = make(run)
        first, last = first + before, last + after
    return first, last


def _baselines_phase(run: Run, history: dict, writer: MetricsWriter, startup: Startup) -> None:
    """The baselines, unless the run resumed has them or ``knn.baselines`` leaves them out."""
    if "baselines" in history:
        return startup.skip("baselines", "kept from the run resumed")
    train_images = run.train_views.steps_per_epoch * run.config.batch_size
    wanted, why = baselines_wanted(run.config, train_images)
    if not wanted:
        return startup.skip("baselines", why)
    what = f"kNN top-1 of raw pixels and of the random-init encoder ({why}): 2 passes over the data"
    with startup.phase("baselines", what):
        history["baselines"] = _baselines(run)
        writer.write_baselines(history["baselines"])


def _baselines(run: Run) -> dict[str, float]:
    """kNN of raw pixels and of the random-init encoder, and for a run started with
    ``init_from`` of the weights it loaded (also when a resumed run lost its baselines file)."""
    t0 = time.time()
    encoder, fresh = run.setup.algorithm.encoder_variables, run.checkpointer.restored_step is None
    init_from = run.config.init_from
    initial = run.state if fresh and not init_from else run.setup.initial_state()
    if init_from:
        loaded = run.state if fresh else load_encoder_weights(init_from, initial, run.setup)
        baselines = run.monitor.baselines(encoder(initial), encoder(loaded))
    else:
        baselines = run.monitor.baselines(encoder(initial))
    logging.info("baselines (%.0fs): %s", time.time() - t0, baselines)
    return baselines


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    disabled = not enabled or bool(os.environ.get("MOCO_JAX_NO_PROGRESS"))
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=disabled)


def _summary(history: dict) -> dict[str, float]:
    summary = dict(history.get("baselines", {}))
    epochs = history.get("epochs", [])
    if epochs:
        summary.update(
            {f"final_{k}": v for k, v in epochs[-1].items() if not k.endswith("_seconds")}
        )
    return summary
