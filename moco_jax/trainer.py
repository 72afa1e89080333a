"""The pretraining loop: the one place with side effects (data loading, logging, checkpoints).

Sections: set-up (mesh, data, engine, state or checkpoint), baselines, the loop (views on device,
step, progress bar, metrics), per-epoch kNN and checkpoints, and the final plot and summary.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from moco_jax.checkpointing import Checkpointer, TrainingDiverged
from moco_jax.faults import Faults
from moco_jax.mesh import put_replicated
from moco_jax.metrics_io import MetricsWriter, plot_history
from moco_jax.run_setup import initial_state, setup_run

__all__ = ["TrainingDiverged", "train_and_evaluate"]


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Pretrain with MoCo as ``config`` says, writing everything under ``workdir``.

    Rerunning with the same ``workdir`` resumes from its latest checkpoint, exactly: the data
    order is a function of the step, and the running epoch loss is saved with the state. SIGTERM
    saves the current step and raises ``Preempted``; a NaN/inf loss or state raises
    ``TrainingDiverged`` and is never saved.
    Returns the final summary (last epoch's loss, kNN top-1 and the baselines).
    """
    run = setup_run(config, workdir)
    engine, monitor, checkpointer = run.engine, run.monitor, run.checkpointer
    state, workdir_path = run.state, run.workdir
    train_views = run.train_views
    steps_per_epoch = train_views.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    start_step = int(state.step)
    writer = MetricsWriter(workdir_path, enabled=jax.process_index() == 0)
    writer.rewind(start_step, steps_per_epoch)
    history = writer.read_history()
    if jax.process_index() == 0:
        (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    # --- Baselines: what pretraining has to beat (computed once per workdir). ---
    if "baselines" not in history:
        t0 = time.time()
        if config.get("init_from"):  # the state holds the loaded weights, not a random init
            random_init = initial_state(engine, config).query_variables()
            baselines = monitor.baselines(random_init, state.query_variables())
        else:
            baselines = monitor.baselines(state.query_variables())
        writer.write_baselines(baselines)
        history["baselines"] = baselines
        logging.info("baselines (%.0fs): %s", time.time() - t0, baselines)

    # --- The loop. ---
    progress = _progress_bar(total_steps, start_step)
    epoch_loss, epoch_steps = _resumed_epoch_loss(
        checkpointer, start_step, steps_per_epoch, engine.mesh
    )
    train_views.restore(checkpointer.restored_extra)  # e.g. streamed data's skipped-image count
    window_start, window_steps = time.time(), 0
    faults = Faults.from_env()  # test-only fault injection; inert unless MOCO_JAX_FAULT_* is set
    checkpointer.watch_sigterm()
    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        with jax.transfer_guard("disallow"):  # a step sends nothing implicitly host<->device
            state, metrics = engine.train_step(state, *train_views(step))
        state, metrics = faults.after_step(step + 1, state, metrics)
        epoch_loss = metrics["loss"] if epoch_loss is None else epoch_loss + metrics["loss"]
        epoch_steps += 1
        checkpointer.save(step + 1, state, extra=_extra(epoch_loss, train_views))
        faults.after_save(step + 1)
        window_steps += 1
        last_of_epoch = step_in_epoch == steps_per_epoch - 1
        if (step + 1) % config.log_every_steps == 0 or last_of_epoch:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            _check_finite(scalars["loss"], step + 1, checkpointer)
            elapsed = time.time() - window_start
            scalars["images_per_sec"] = window_steps * config.batch_size / max(elapsed, 1e-9)
            writer.write_step(step + 1, scalars)
            progress.set_postfix(
                epoch=f"{epoch + 1}/{config.epochs}",
                loss=f"{scalars['loss']:.3f}",
                img_s=f"{scalars['images_per_sec']:.0f}",
            )
            progress.update(window_steps)
            window_start, window_steps = time.time(), 0
        if last_of_epoch:
            record = {"epoch": epoch + 1, "loss": float(epoch_loss) / epoch_steps}
            if hasattr(train_views, "skipped_images"):  # streamed data: undecodable images
                record["skipped_images"] = train_views.skipped_images
            _check_finite(record["loss"], step + 1, checkpointer)
            if (epoch + 1) % config.knn.every_epochs == 0 or epoch + 1 == config.epochs:
                t0 = time.time()
                record.update(monitor.evaluate(state.query_variables()))
                record["knn_seconds"] = time.time() - t0
            writer.write_epoch(record)
            history.setdefault("epochs", []).append(record)
            progress.write(_describe_epoch(record))
            epoch_loss, epoch_steps = None, 0
            checkpointer.save(step + 1, state, force=True, extra=_extra(0.0, train_views))
            window_start = time.time()
        if checkpointer.reached_preemption(step + 1):
            progress.close()
            checkpointer.stop_for_preemption(step + 1, state, _extra(epoch_loss, train_views))
    progress.close()
    checkpointer.close()

    # --- Results: plot and summary. ---
    summary = _summary(history)
    if jax.process_index() == 0:
        plot_history(history, workdir_path / "pretraining.png", config.dataset.name)
        (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _extra(epoch_loss: Any, train_views: Any) -> dict[str, Any]:
    """The trainer's and the input pipeline's scalars saved with each checkpoint."""
    return {"epoch_loss_sum": epoch_loss, **train_views.checkpoint_extra()}


def _resumed_epoch_loss(
    checkpointer: Checkpointer, start_step: int, steps_per_epoch: int, mesh: Mesh
) -> tuple[jax.Array | None, int]:
    """The running (loss sum, steps) of the epoch ``start_step`` falls in, as saved with it.

    The sum lives on the mesh like the step's loss (None: nothing summed yet this epoch)."""
    saved = checkpointer.restored_extra.get("epoch_loss_sum")
    steps = start_step % steps_per_epoch
    if saved is None or steps == 0:
        return None, 0
    return put_replicated(mesh, np.float32(saved)), steps


def _check_finite(loss: float, step: int, checkpointer: Checkpointer) -> None:
    if not math.isfinite(loss):
        checkpointer.close()
        raise TrainingDiverged(
            f"loss became {loss} at step {step}; stopping without saving this state "
            f"(latest good checkpoint: step {checkpointer.latest_step()}). Lower optim.base_lr "
            f"or check the data."
        )


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        disable=jax.process_index() != 0 or bool(os.environ.get("MOCO_JAX_NO_PROGRESS")),
    )


def _describe_epoch(record: dict) -> str:
    text = f"epoch {record['epoch']}: loss {record['loss']:.4f}"
    if "knn_head" in record:
        text += f", kNN top-1 head {record['knn_head']:.2f}% backbone {record['knn_backbone']:.2f}%"
    return text


def _summary(history: dict) -> dict[str, float]:
    summary = dict(history.get("baselines", {}))
    epochs = history.get("epochs", [])
    if epochs:
        last = epochs[-1]
        summary.update({f"final_{k}": v for k, v in last.items() if k != "knn_seconds"})
    return summary
