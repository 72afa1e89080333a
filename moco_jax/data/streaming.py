"""Large-image datasets (ImageNet, Imagenette): the host decodes and crops, the device the rest.

Per example the host (tf.data, parallel) decodes the JPEG once, only inside the union of two
independent random-resized-crop windows, and resizes each window to the training size as uint8
(``moco_jax.data.host_crops``: each view is its window of the whole decoded image), or with
``dataset.resize_on = "device"`` sends the decoded union padded into a fixed buffer with the
views' boxes, and the device resizes (``moco_jax.data.window_resize``). The windows follow the
rule the device crop follows too (``moco_jax.data.augment.crop_window``, torchvision's sampler):
area in ``augment.crop_scale``, log-uniform aspect ratio in ``augment.crop_ratio``, 10 tries,
then the largest centred crop whose aspect ratio is clamped into ``crop_ratio`` (the whole image
when its own aspect ratio is within). Flip, colour jitter, grayscale, blur, solarize and
normalisation then run on device (``moco_jax.data.augment`` with the crop turned off).

Every random choice is a stateless function of ``(seed, epoch, example index)`` and the record
order of an epoch is a fixed shuffle of ``(seed, epoch)``, so the stream of step ``s`` can be
rebuilt after a restart by skipping records (cheap: nothing is decoded while skipping).
Images that fail to read or decode, and images outside ``host_crops.MIN_SIDE`` x ``MAX_PIXELS``, are
skipped and counted (``skipped_images`` in the epoch records): never a crash mid-epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from moco_jax.data.augment import augment_batch, two_views
from moco_jax.data.host_crops import _tf, make_crop_fn, make_eval_fn, resizes_on_device
from moco_jax.data.tfds_source import holds_paths
from moco_jax.data.window_resize import resize_windows
from moco_jax.data.windows import EmptyWindow, full_windows
from moco_jax.mesh import DeviceViews, shard_batch, shard_views

SHUFFLE_BUFFER = 16_384
IN_FLIGHT_PER_THREAD = 4
CropPair = tuple[np.ndarray, np.ndarray]  # (crops_q, crops_k) of one host batch, uint8


def records(builder, split: str):
    """This process's ``(index, encoded image, label)`` records, images left undecoded (a
    folder's: ``(index, path, label)``)."""
    import tensorflow_datasets as tfds

    tf = _tf()
    if holds_paths(builder):
        return builder.records(split, jax.process_index(), jax.process_count()).enumerate()
    process_split = split
    if jax.process_count() > 1:
        process_split = tfds.split_for_jax_process(split, drop_remainder=True)
    ds = builder.as_dataset(
        split=process_split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=False),
    )
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))
    return ds.enumerate()


def count_records(builder, split: str) -> int:
    """Examples of ``split`` that this process reads."""
    total = builder.info.splits[split].num_examples
    return total // jax.process_count() if jax.process_count() > 1 else total


def crop_dataset(
    records_ds,
    config: Any,
    epoch: int,
    skip: int,
    batch: int,
    num_views: int = 2,
    read: bool = False,
    positions: bool = False,
):
    """Epoch ``epoch``'s shuffled records from ``skip`` on, ``num_views`` host crops each, batched
    (``read``: the records hold paths, read in the same map; ``positions``: each row's position
    in the epoch's order as a last column).

    Unreadable and undecodable images are dropped (``ignore_errors``); callers count them.
    """
    tf = _tf()
    size = int(records_ds.cardinality())
    buffer = SHUFFLE_BUFFER if size < 0 else max(1, min(size, SHUFFLE_BUFFER))
    ds = records_ds.shuffle(buffer, seed=config.seed * 7919 + epoch, reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(skip)
    crop = make_crop_fn(config, epoch, num_views, read)
    host_threads = config.dataset.get("host_threads", 0)
    threads = host_threads or _usable_cores()
    ds = ds.map(
        lambda position, record: (*crop(*record), position) if positions else crop(*record),
        # Records in flight: 4 a thread (at most 256 more than threads: each holds a decoded
        # union), so that one slow image (a large one resized on the host) holds back its own
        # slot only, not the threads (outputs stay in order).
        num_parallel_calls=min(IN_FLIGHT_PER_THREAD * threads, threads + 256),
        deterministic=True,
    )
    ds = ds.ignore_errors()
    if resizes_on_device(config):  # each union padded into the buffer as it is batched
        side, channels = config.dataset.union_buffer, config.dataset.num_channels
        shapes = [spec.shape for spec in ds.element_spec]
        shapes[0] = tf.TensorShape([side, side, channels])
        ds = ds.padded_batch(batch, padded_shapes=tuple(shapes), drop_remainder=False)
    else:
        ds = ds.batch(batch, drop_remainder=False)
    return with_threads(ds.prefetch(2), host_threads)


def _usable_cores() -> int:
    """Cores this process may run on (all the machine's where affinity is unknown: macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def with_threads(ds, threads: int):
    """``ds`` run by a private pool of ``threads`` threads (0: tf.data's default pool, one
    thread per core this process may use)."""
    if not threads:
        return ds
    options = _tf().data.Options()
    options.threading.private_threadpool_size = threads
    return ds.with_options(options)


def eval_batches(builder, split: str, config: Any, batch: int, limit: int = 0):
    """``(uint8 images, labels)`` numpy batches of ``split``, centre-cropped, in order."""
    tf = _tf()
    ds = records(builder, split)
    if limit:
        ds = ds.take(limit)
    eval_fn = make_eval_fn(config, holds_paths(builder))
    ds = ds.map(lambda index, example: eval_fn(*example), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors().batch(batch).prefetch(2)
    return ds.as_numpy_iterator()


def make_crop_augment_fn(mesh: Mesh, config: Any, labelled: bool = False):
    """The device half: jitted ``(crops_q, crops_k, rng, step) -> (view_q, view_k, step + 1)``,
    crop turned off (see ``shard_views``); ``labelled``: ``(crops, labels, ...) -> (view,
    labels, ...)``. When the device resizes (``dataset.resize_on``) the crops are the host's
    ``(unions, boxes)``, and ``(unions, (boxes, labels))`` when ``labelled``."""
    aug = config.augment.copy_and_resolve_references()
    aug.crop = False  # done on the host
    mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
    size = config.dataset.image_size

    def per_device(crops_q, crops_k, step, rng):
        del step  # the crops already are this step's
        if resizes_on_device(config):  # crops_q: the unions; crops_k: the boxes (and labels)
            boxes, labels = crops_k if labelled else (crops_k, None)
            views = [resize_windows(crops_q, boxes[:, v], size) for v in range(boxes.shape[1])]
            crops_q, crops_k = views[0], labels if labelled else views[1]
        if labelled:
            return augment_batch(rng, crops_q, aug, 0, size, mean, std), crops_k
        return two_views(rng, crops_q, aug, size, mean, std, images_k=crops_k)

    return shard_views(mesh, per_device)


class _Counted:
    """An iterator of row batches that counts the rows it has given (``rows``)."""

    def __init__(self, batches: Iterator):
        self.batches, self.rows = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.rows += len(batch[0])
            yield batch


class StreamingViews:
    """``views(step)`` for datasets streamed from disk: host crops, device augmentation.

    Steps must be asked for in order; asking for another step (a resume) rebuilds the stream
    at that step's position.
    """

    def __init__(self, mesh: Mesh, builder, config: Any, inputs: str = "two_views"):
        self.mesh, self.builder, self.config = mesh, builder, config
        self.local_batch = config.batch_size // jax.process_count()
        self.num_records = count_records(builder, "train")
        self.steps_per_epoch = self.num_records // self.local_batch
        self.skipped_images = 0
        self._iterator: Iterator | None = None
        self._next_step = None
        self._records = records(builder, "train")
        if inputs not in ("two_views", "labelled_view"):
            raise ValueError(f"streamed datasets give two views or one labelled view, not {inputs}")
        self._num_views = 2 if inputs == "two_views" else 1  # else: one crop and its label
        augment = make_crop_augment_fn(mesh, config, labelled=self._num_views == 1)
        self._augment = DeviceViews(mesh, augment, config.seed + 1)

    def _epoch_batches(self, epoch: int, start_step: int) -> Iterator[CropPair]:
        """The batches of ``epoch`` from ``start_step`` on, each its window of the epoch's records
        (``windows.full_windows``: a failed image's slot holds a copy of another of its window);
        once exhausted, the epoch's failed images are added to ``skipped_images``."""
        skip, batch = start_step * self.local_batch, self.local_batch
        read = holds_paths(self.builder)
        args = (self._records, self.config, epoch, skip, batch, self._num_views, read, True)
        decoded = _Counted(crop_dataset(*args).as_numpy_iterator())
        try:
            for *crops, labels, _ in full_windows(decoded, start_step, self.steps_per_epoch, batch):
                # (crops_q, crops_k), (crop, labels), or resized on the device (unions, boxes)
                # and (unions, (boxes, labels)): what ``make_crop_augment_fn`` takes
                first, *rest = crops
                rest += [labels] if self._num_views == 1 else []
                yield first, rest[0] if len(rest) == 1 else tuple(rest)
        except EmptyWindow as err:
            from moco_jax.data.tfds_source import DatasetError

            raise DatasetError(
                f"epoch {epoch + 1}: {err} (is the training data mostly bad?)"
            ) from None
        self.skipped_images += self.num_records - skip - decoded.rows

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint must keep of this pipeline: the undecodable images counted so far
        (and a folder's fingerprint, see ``check_resumable``)."""
        fingerprint = self.builder.fingerprint() if holds_paths(self.builder) else {}
        return {"skipped_images": self.skipped_images, **fingerprint}

    def counters(self) -> dict[str, int]:
        """The epoch record's input counters: images skipped so far (unreadable, undecodable, out
        of bounds), over the whole run."""
        return {"skipped_images": self.skipped_images}

    def check_resumable(self, extra: dict) -> None:
        """Refuse a checkpoint's ``extra`` written over other data (a folder's files changed)."""
        if holds_paths(self.builder):
            self.builder.check_unchanged(extra)

    def restore(self, extra: dict) -> None:
        """Take back ``checkpoint_extra()`` from a restored checkpoint's ``extra``."""
        self.skipped_images = int(extra.get("skipped_images", 0))

    def __call__(self, step: int) -> tuple[jax.Array, jax.Array]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if self._next_step != step or step_in_epoch == 0:
            self._iterator = self._epoch_batches(epoch, step_in_epoch)
        crops_q, crops_k = next(self._iterator)
        self._next_step = step + 1
        if step_in_epoch == self.steps_per_epoch - 1:
            for _ in self._iterator:  # the dropped partial window; counts the epoch's skips
                pass
        crops = jax.tree.map(lambda rows: shard_batch(self.mesh, rows), (crops_q, crops_k))
        return self._augment(step, *crops)
