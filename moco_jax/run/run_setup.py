"""Everything a run needs before its first step, shared by training and evaluation.

Order matters: config checks and the dataset name come first (cheap, before any data is read or
anything is compiled), then the data, then the algorithm and the state (fresh or restored).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from moco_jax import storage
from moco_jax.algorithms import State
from moco_jax.assemble import Setup, build, mesh_for
from moco_jax.config.checks import ConfigError
from moco_jax.data.folder_source import absolute_name
from moco_jax.data.host_crops import resizes_on_device
from moco_jax.data.resident import ResidentTrainSet, ResidentViews, put_sharded
from moco_jax.data.streaming import StreamingViews, eval_batches
from moco_jax.data.tfds_source import (
    RESIDENT_DATASETS,
    get_builder,
    holds_paths,
    load_arrays,
    prepared_builder,
)
from moco_jax.evaluation.monitor import KnnMonitor
from moco_jax.interop.init_from import load_encoder_weights
from moco_jax.mesh import DATA_AXIS, shard_batch
from moco_jax.run.checkpointing import Checkpointer
from moco_jax.run.workdir_lock import WorkdirLock


@dataclasses.dataclass
class Run:
    """A configured run: its set-up (mesh, algorithm), data on device, state and checkpoints."""

    setup: Setup
    workdir: epath.Path
    train_views: ResidentViews | StreamingViews  # step -> (view_q, view_k) on the mesh
    state: State
    checkpointer: Checkpointer
    monitor: KnnMonitor | None  # kNN and its baselines (None: a run that reports otherwise)
    lock: WorkdirLock | None  # None: a read-only run (evaluate knn) takes no lock
    # state -> the epoch record's evaluation entries, every ``eval_every_epochs`` and at the end.
    evaluate: Callable[[State], dict[str, float]]
    eval_every_epochs: int
    data: Data  # the training views and the evaluation sources

    @property
    def config(self) -> Any:
        return self.setup.config

    def close(self) -> None:
        """Wait for the last checkpoint to be written, then let the next run in."""
        try:
            self.checkpointer.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def setup_run(config: Any, workdir: str | epath.Path, read_only: bool = False) -> Run:
    """Validate, load the data, build the algorithm and restore the latest checkpoint if any.

    ``read_only``: the workdir is only read (``evaluate knn``), without its lock, so the run
    may be training there: damaged checkpoints are skipped but left in place, and nothing is
    checked for saving or written."""
    mesh = mesh_for(config)  # every config rule that needs no data, once
    config.dataset.name = absolute_name(config.dataset.name)  # stored so, found from anywhere
    early = build(config, 1, mesh=mesh)  # a run that cannot fit in memory fails before the data
    inputs = early.algorithm.inputs
    listed = get_builder(config.dataset.name, config.dataset.data_dir)  # unknown names fail first
    workdir = epath.Path(workdir)
    what = "linear.pretrained" if "linear" in config else "init_from"
    storage.check_reachable(what, config.init_from or "")  # a bucket: before the workdir
    if read_only:
        storage.check_reachable("workdir", workdir)
        lock = None
    else:
        _check_workdir(workdir)
        lock = WorkdirLock(workdir).acquire()  # one run per workdir, before anything is written
    checkpointer = None
    try:
        data = load_data(config, mesh, inputs, listed)
        views, bank_source, test_source = data.train_views, data.bank_source, data.test_source

        _check_queue(config, views.steps_per_epoch * config.batch_size)
        # Algorithm and state (fresh or restored).
        setup = build(config, views.steps_per_epoch, mesh=mesh)
        state = setup.initial_state()
        checkpointer = Checkpointer(workdir / "checkpoints", config, read_only=read_only)
        if not read_only:
            checkpointer.check_can_save(state)  # read-only or full disk: fail before training
        state = checkpointer.restore_latest(state)  # refuses another config's, skips damaged
        _check_epoch_length(checkpointer, views.steps_per_epoch)
        if not read_only:
            views.check_resumable(checkpointer.restored_extra)  # e.g. a folder's files changed
        if checkpointer.restored_step is None and config.init_from:
            source = storage.absolute(config.init_from)  # orbax reads absolute paths only
            state = load_encoder_weights(source, state, setup, what)
        model = setup.algorithm.model
        monitor = None
        if test_source is not None:
            monitor = KnnMonitor(mesh, model, config, bank_source, test_source, data.num_classes)
    except BaseException:
        if checkpointer is not None:  # else orbax's threads print a traceback at exit
            checkpointer.close()
        if lock is not None:
            lock.release()
        raise
    encoder = setup.algorithm.encoder_variables
    evaluate = lambda state: monitor.evaluate(encoder(state)) if monitor else {}
    return Run(
        setup, workdir, views, state, checkpointer, monitor, lock, evaluate,
        config.knn.every_epochs, data,
    )  # fmt: skip


@dataclasses.dataclass
class Data:
    """A run's data on the mesh: training views and the kNN monitor's two sources."""

    train_views: ResidentViews | StreamingViews
    bank_source: Any  # () -> iterable of (images, labels) on the mesh: the kNN memory bank
    test_source: Any  # () -> the same for the evaluated split (None: no labelled split)
    num_classes: int
    class_names: tuple[str, ...] = ()  # the dataset's, when its metadata names them


def load_data(config: Any, mesh: Mesh, inputs: str = "two_views", source: Any = None) -> Data:
    """Prepare the dataset once and load this process's share (small datasets stay on device);
    the training views are what the algorithm's step takes (``Algorithm.inputs``). ``source``:
    a folder already listed (``get_builder``), not listed again."""
    dataset = config.dataset
    builder = source if holds_paths(source) else None
    builder = builder or prepared_builder(dataset.name, dataset.data_dir, dataset.download)
    if dataset.name in RESIDENT_DATASETS:
        if resizes_on_device(config):
            logging.warning(
                "dataset.resize_on='device' applies to streamed datasets; %s stays on the "
                "devices, which crop and resize it already",
                dataset.name,
            )
        sources = _resident_data(config, mesh, builder, inputs)
    else:
        sources = _streaming_data(config, mesh, builder, inputs)
    label = builder.info.features["label"]
    return Data(*sources, label.num_classes, tuple(getattr(label, "names", None) or ()))


def streamed_source(mesh: Mesh, builder, config: Any, split: str, limit: int = 0):
    """``() -> batches`` of ``split``'s centre crops and labels on the mesh (the first ``limit``
    of this process's share; 0: all), the last batch padded with label -1."""
    eval_batch = config.batch_size // jax.process_count()

    def batches():
        for images, labels in eval_batches(builder, split, config, eval_batch, limit):
            short = eval_batch - len(labels)  # pad the last batch; label -1 is ignored
            if short:
                images = np.concatenate([images, np.zeros((short, *images.shape[1:]), np.uint8)])
                labels = np.concatenate([labels, np.full(short, -1, np.int32)])
            yield shard_batch(mesh, images), shard_batch(mesh, labels.astype(np.int32))

    return batches


def _resident_data(config: Any, mesh: Mesh, builder, inputs: str):
    """Train set on device (sampled by index) and the kNN sources over the resident arrays."""
    dataset, num_devices = config.dataset, mesh.shape[DATA_AXIS]
    train_images, train_labels = load_arrays(builder, "train", dataset.max_train_examples)
    test_images, test_labels = load_arrays(builder, "test", dataset.max_test_examples)
    per_device_batch = config.batch_size // num_devices
    _check_data_fits(config, train_images, per_device_batch, num_devices)
    images, labels, per_device = put_sharded(mesh, train_images, train_labels, pad=False)
    train_set = ResidentTrainSet(mesh, images, labels, per_device, per_device_batch, config.seed)
    test = put_sharded(mesh, test_images, test_labels, pad=True)[:2]
    return ResidentViews(train_set, config, inputs), lambda: [(images, labels)], lambda: [test]


def _streaming_data(config: Any, mesh: Mesh, builder, inputs: str):
    """Host-cropped training stream and streamed kNN sources (centre crops)."""
    dataset = config.dataset
    if not config.augment.crop:
        raise ConfigError("augment.crop must be on for streamed datasets (the host crops)")
    # Cached features (``run.cached_features``) replace these views but keep their epoch.
    streamed = "labelled_view" if inputs == "features" else inputs
    views = StreamingViews(mesh, builder, config, streamed)
    if views.num_records < views.local_batch:
        raise ConfigError(
            f"batch_size {config.batch_size} is larger than the {views.num_records} training "
            f"examples of {dataset.name}"
        )

    def source(split: str, limit: int):
        return streamed_source(mesh, builder, config, split, limit)

    test_split = "validation" if "validation" in builder.info.splits else "test"
    if test_split not in builder.info.splits:
        logging.warning(
            "%s has no labelled evaluation split (val/ or test/): the kNN monitor is off",
            dataset.name,
        )
        return views, source("train", dataset.max_train_examples), None
    return (
        views,
        source("train", dataset.max_train_examples),
        source(test_split, dataset.max_test_examples),
    )


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
    if len(images) < config.batch_size:
        raise ConfigError(
            f"batch_size {config.batch_size} is larger than the {len(images)} training examples"
        )
    if len(images) // num_devices < per_device_batch:
        raise ConfigError(
            f"each of the {num_devices} devices holds {len(images) // num_devices} examples, "
            f"fewer than its batch of {per_device_batch}"
        )


def _check_queue(config: Any, images_per_epoch: int) -> None:
    """MoCo's queue must hold fewer keys than an epoch has images: a larger one holds keys of the
    same images twice, a query's own image among its negatives (docs/own_images.md)."""
    if config.algorithm == "moco" and config.moco.queue_size > images_per_epoch:
        raise ConfigError(
            f"moco.queue_size (K={config.moco.queue_size}) is larger than the {images_per_epoch} "
            f"images of an epoch of {config.dataset.name}: the queue would hold a query's own "
            f"image among its negatives; take K well under the dataset size (the official "
            f"CIFAR-10 demo: 4096 of 50,000 images)"
        )


def _check_epoch_length(checkpointer: Checkpointer, steps_per_epoch: int) -> None:
    """A resumed run must cut the data into epochs as the saved one did."""
    saved = checkpointer.restored_extra.get("steps_per_epoch")
    if saved is not None and saved != steps_per_epoch:
        raise ConfigError(
            f"the checkpoint at step {checkpointer.restored_step} was saved by a run with "
            f"{saved} steps per epoch, this one has {steps_per_epoch} (another device count?); "
            f"resume with the saved settings, or start another --workdir with "
            f"--config.init_from to take its encoder"
        )


def _check_workdir(workdir: epath.Path) -> None:
    """Fail before training if the workdir cannot be written (local path or bucket: one line
    naming the bucket when it cannot be reached)."""
    storage.check_reachable("workdir", workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        storage.probe_writable(workdir)
    except Exception as err:  # a bucket's file system raises its own kinds
        if storage.is_remote(workdir):
            raise storage.unreachable("workdir", workdir, err, "write to") from None
        if isinstance(err, OSError):
            raise OSError(f"workdir {workdir} is not writable: {err.strerror or err}") from err
        raise
