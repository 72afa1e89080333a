"""The pretraining loop: the one place with side effects (data loading, logging, checkpoints).

Sections: set-up (mesh, data, engine, state or checkpoint), baselines, the loop (views on device,
step, progress bar, metrics), per-epoch kNN and checkpoints, and the final plot and summary.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moco_jax.checkpointing import Checkpointer
from moco_jax.data.resident import ResidentTrainSet, make_view_fn, put_sharded
from moco_jax.data.tfds_source import (
    RESIDENT_DATASETS,
    DatasetError,
    get_builder,
    load_arrays,
    prepared_builder,
)
from moco_jax.engine import build_engine
from moco_jax.mesh import make_data_mesh
from moco_jax.metrics_io import MetricsWriter, plot_history
from moco_jax.monitor import KnnMonitor
from moco_jax.step import DATA_AXIS
from moco_jax.validation import ConfigError, validate_config


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


def _check_data_fits(config: Any, images: np.ndarray, per_device_batch: int, num_devices: int):
    """Dataset-vs-config rules that need the data: channels, image size, batch vs dataset size."""
    height, width, channels = images.shape[1:]
    if channels != config.dataset.num_channels:
        raise ConfigError(
            f"dataset.num_channels is {config.dataset.num_channels} but {config.dataset.name} "
            f"images have {channels} channel(s)"
        )
    if not config.augment.crop and (height, width) != (config.dataset.image_size,) * 2:
        raise ConfigError(
            f"dataset.image_size {config.dataset.image_size} differs from the images' "
            f"{height}x{width} and augment.crop is off (nothing would resize them)"
        )
    if config.model.backbone.startswith("resnet") and not config.model.cifar_stem:
        if config.dataset.image_size < 32:
            raise ConfigError(
                f"dataset.image_size {config.dataset.image_size} is too small for the ImageNet "
                f"stem (it downsamples 32x); set model.cifar_stem=True for small images"
            )
    if len(images) < config.batch_size:
        raise ConfigError(
            f"batch_size {config.batch_size} is larger than the {len(images)} training examples"
        )
    if len(images) // num_devices < per_device_batch:
        raise ConfigError(
            f"each of the {num_devices} devices holds {len(images) // num_devices} examples, "
            f"fewer than its batch of {per_device_batch}"
        )


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Pretrain with MoCo as ``config`` says, writing everything under ``workdir``.

    Rerunning with the same ``workdir`` resumes from its latest checkpoint.
    Returns the final summary (last epoch's loss, kNN top-1 and the baselines).
    """
    # --- Set-up: mesh and config checks before any data or compilation. ---
    mesh = make_data_mesh(config.num_devices or None)
    num_devices = mesh.shape[DATA_AXIS]
    validate_config(config, num_devices)
    get_builder(config.dataset.name, config.dataset.data_dir)  # unknown names fail first
    if config.dataset.name not in RESIDENT_DATASETS:
        raise DatasetError(
            f"dataset {config.dataset.name!r}: only datasets that fit on the accelerators "
            f"({', '.join(RESIDENT_DATASETS)}) have an input pipeline yet"
        )
    workdir_path = pathlib.Path(workdir)
    _check_workdir(workdir_path)

    # --- Data: prepared once, this process's share, resident on device. ---
    dataset = config.dataset
    builder = prepared_builder(dataset.name, dataset.data_dir, dataset.download)
    train_images, train_labels = load_arrays(builder, "train", dataset.max_train_examples)
    test_images, test_labels = load_arrays(builder, "test", dataset.max_test_examples)
    per_device_batch = config.batch_size // num_devices
    _check_data_fits(config, train_images, per_device_batch, num_devices)
    images, labels, per_device = put_sharded(mesh, train_images, train_labels, pad=False)
    train_set = ResidentTrainSet(mesh, images, labels, per_device, per_device_batch, config.seed)
    steps_per_epoch = train_set.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs

    # --- Engine and state (fresh or restored). ---
    engine = build_engine(config, mesh, steps_per_epoch)
    image_shape = (config.dataset.image_size, config.dataset.image_size, train_images.shape[-1])
    state = engine.init_state(jax.random.key(config.seed), image_shape, config.moco.queue_size)
    checkpointer = Checkpointer(workdir_path / "checkpoints", config)
    state = checkpointer.restore_latest(state)
    start_step = int(state.step)
    view_fn = make_view_fn(mesh, config)
    data_rng = jax.random.key(config.seed + 1)
    monitor = KnnMonitor.create(
        mesh, engine.model, config, train_set.images, train_set.labels, test_images, test_labels
    )
    writer = MetricsWriter(workdir_path, enabled=jax.process_index() == 0)
    history = writer.read_history(up_to_epoch=start_step // steps_per_epoch)
    if jax.process_index() == 0:
        (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    # --- Baselines: what pretraining has to beat (computed once per workdir). ---
    if "baselines" not in history:
        t0 = time.time()
        baselines = {"knn_pixels": monitor.pixel_baseline()}
        random_init = monitor.evaluate({"params": state.params, "batch_stats": state.batch_stats})
        baselines.update({f"random_init_{k}": v for k, v in random_init.items()})
        writer.write_baselines(baselines)
        history["baselines"] = baselines
        logging.info("baselines (%.0fs): %s", time.time() - t0, baselines)

    # --- The loop. ---
    progress = _progress_bar(total_steps, start_step)
    epoch_loss, epoch_steps = jnp.zeros(()), 0
    window_start, window_steps = time.time(), 0
    metrics = None
    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if step_in_epoch == 0 or step == start_step:
            epoch_indices = train_set.epoch_indices(epoch)
        indices = train_set.batch_indices(epoch_indices, step_in_epoch)
        views = view_fn(train_set.images, indices, jax.random.fold_in(data_rng, step))
        state, metrics = engine.train_step(state, *views)
        checkpointer.save(step + 1, state)
        epoch_loss, epoch_steps = epoch_loss + metrics["loss"], epoch_steps + 1
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
            _check_finite(record["loss"], step + 1, checkpointer)
            if (epoch + 1) % config.knn.every_epochs == 0 or epoch + 1 == config.epochs:
                t0 = time.time()
                record.update(
                    monitor.evaluate({"params": state.params, "batch_stats": state.batch_stats})
                )
                record["knn_seconds"] = time.time() - t0
            writer.write_epoch(record)
            history.setdefault("epochs", []).append(record)
            progress.write(_describe_epoch(record))
            epoch_loss, epoch_steps = jnp.zeros(()), 0
            checkpointer.save(step + 1, state, force=True)
            window_start = time.time()
    progress.close()
    checkpointer.close()

    # --- Results: plot and summary. ---
    summary = _summary(history)
    if jax.process_index() == 0:
        plot_history(history, workdir_path / "pretraining.png", config.dataset.name)
        (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_workdir(workdir: pathlib.Path) -> None:
    """Fail before training if the workdir cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OSError(f"workdir {workdir} is not writable: {err.strerror or err}") from err


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
