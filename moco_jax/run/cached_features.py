"""``linear.cached_features``: the classifier trains on each training image's backbone features,
computed once without augmentation (a faster protocol than the official one, which augments).

A resident dataset's features come from its arrays on the devices. A streamed one (ImageNet as
TFDS, a folder of images) is read once as the kNN memory bank is (centre crops, in file
order) and its features are kept on the devices instead of the images: a dataset whose
images do not fit there can still have features that do (ImageNet: 1.28M x 2048 float32, 10 GB
over the devices). Either way the classifier then samples them as a resident dataset
(``ResidentViews``), a pure function of ``(seed, step)``.

The streamed epoch keeps the length of the streamed views it replaces (the learning-rate
schedule and the checkpoints count in them): images that could not be read are counted as
skipped, and their places in the epoch are taken by the first images again, as the streamed
pipeline fills a failed image's slot with another image of its batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from moco_jax.data.resident import ResidentTrainSet, ResidentViews, put_sharded
from moco_jax.data.streaming import StreamingViews
from moco_jax.evaluation.classifier import ClassifierMonitor
from moco_jax.mesh import DATA_AXIS
from moco_jax.run.run_setup import streamed_source


def cached_views(run: Any, monitor: ClassifierMonitor) -> ResidentViews:
    """The training views of ``run`` replaced by the features of its unaugmented training
    images under ``run.state``'s encoder (and ``monitor.cached_test`` set to the test split's)."""
    views = run.train_views
    if isinstance(views, StreamingViews):
        cached = _CachedStream(_streamed_train_set(run, monitor), run.config, views)
    else:
        train_set = views.train_set  # resident: the bank source holds the same arrays
        features = monitor.features(run.state, train_set.images)
        train_set = dataclasses.replace(train_set, images=features)
        cached = ResidentViews(train_set, run.config, "features")
    monitor.cached_test = monitor.features_of(run.state, run.data.test_source)
    logging.info(
        "cached features: train %s, test %s",
        cached.train_set.images.shape,
        monitor.cached_test[0].shape,
    )
    return cached


def local_rows(array: jax.Array, mesh) -> np.ndarray:
    """This process's rows of a batch sharded over ``data``, on the host."""
    local = multihost_utils.global_array_to_host_local_array(array, mesh, P(DATA_AXIS))
    return np.asarray(jax.device_get(local))


def _streamed_train_set(run: Any, monitor: ClassifierMonitor) -> ResidentTrainSet:
    """The features and labels of every training image of this process's share, centre-cropped
    as for the kNN bank (all of them: ``dataset.max_train_examples`` limits only the bank), padding
    rows (label -1) dropped; too few rows for an epoch of the streamed views (skipped images) are
    made up from the first ones."""
    mesh, views = run.setup.mesh, run.train_views
    features, labels = [], []
    for images, batch_labels in streamed_source(mesh, views.builder, run.config, "train")():
        features.append(local_rows(monitor.features(run.state, images), mesh))
        labels.append(local_rows(batch_labels, mesh))
    features, labels = np.concatenate(features), np.concatenate(labels)
    kept = labels >= 0
    features, labels = features[kept], labels[kept]
    needed = views.steps_per_epoch * views.local_batch
    views.skipped_images = max(0, views.num_records - len(labels))  # unreadable, undecodable
    if len(labels) < needed:
        logging.warning(
            "%d training image(s) could not be read: the first %d take their places",
            views.skipped_images,
            needed - len(labels),
        )
        again = np.arange(needed - len(labels)) % len(labels)
        features = np.concatenate([features, features[again]])
        labels = np.concatenate([labels, labels[again]])
    images, labels, per_device = put_sharded(mesh, features, labels.astype(np.int32), pad=False)
    per_device_batch = run.config.batch_size // mesh.shape[DATA_AXIS]
    return ResidentTrainSet(mesh, images, labels, per_device, per_device_batch, run.config.seed)


class _CachedStream(ResidentViews):
    """Cached features standing in for streamed views: sampled as a resident dataset, while the
    checkpoints keep what the streamed views keep (a folder's fingerprint, the skipped count),
    so a resume over a changed folder is refused as for any streamed run."""

    def __init__(self, train_set: ResidentTrainSet, config: Any, streamed: StreamingViews):
        super().__init__(train_set, config, "features")
        if self.steps_per_epoch != streamed.steps_per_epoch:  # the schedule counts in these
            raise AssertionError(f"{self.steps_per_epoch} != {streamed.steps_per_epoch} steps")
        self.streamed = streamed

    def checkpoint_extra(self) -> dict:
        return self.streamed.checkpoint_extra()

    def counters(self) -> dict[str, int]:
        return self.streamed.counters()

    def check_resumable(self, extra: dict) -> None:
        self.streamed.check_resumable(extra)
