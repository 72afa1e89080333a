"""The two host pipelines the host-input benchmark times, each in its own pinned process.

- ``ours``: moco_jax's streamed input exactly as ``train.py`` builds it for a folder dataset:
  ``FolderSource`` -> ``StreamingViews`` (tf.data: read, decode inside the crop windows, resize,
  batch, the fixed batch windows) -> ``shard_batch`` (the hand-off to the device), for both crops
  of each batch. Only the device half (``make_crop_augment_fn``) is left out.
- ``official``: MoCo's ``main_moco.py`` input: torchvision ``ImageFolder`` and, twice per image
  (``TwoCropsTransform``), ``RandomResizedCrop(224, scale=(0.2, 1))`` + ``RandomHorizontalFlip``
  on the PIL image, then ``PILToTensor`` (uint8, as ours hands over: the colour ops, ``ToTensor``
  and ``Normalize`` that the official pipeline also runs on the host are left out, in its
  favour), in a ``DataLoader`` with one worker per core, shuffled, ``drop_last``.

Each side runs in a fresh process pinned to the first N allowed cores (``os.sched_setaffinity``
before TensorFlow, JAX or torch start a thread), with tf.data's private thread pool and
TensorFlow's op pools of N threads. The first batch (start-up: threads, worker processes,
tracing) is left out of the time; the rest of one epoch is timed.
"""

from __future__ import annotations

import os
import time
from typing import Any

SIZE = 224
SCALE = (0.2, 1.0)


def pin(cores: list[int]) -> None:
    """Run this process (and every thread and child it starts from now) on ``cores``."""
    os.sched_setaffinity(0, cores)


def _moco_v2_config(root: str, batch: int, threads: int, resize: str = "host"):
    from configs import moco_v2_imagenet

    config = moco_v2_imagenet.get_config()
    config.dataset.name = f"folder:{root}"
    config.batch_size = batch
    config.seed = 0
    if "host_threads" in config.dataset:  # absent in revisions from before the field
        config.dataset.host_threads = threads
    if "resize_on" in config.dataset:  # likewise
        config.dataset.resize_on = resize
    return config


def time_ours(root: str, cores: int, batch: int, resize: str = "host") -> dict[str, Any]:
    """Two-view images/sec of moco_jax's streamed input on ``cores`` (see the module docstring)."""
    from moco_jax.data.streaming import StreamingViews, _tf

    tf = _tf()
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    tf.config.threading.set_intra_op_parallelism_threads(cores)
    import jax

    from moco_jax.data.tfds_source import get_builder
    from moco_jax.mesh import make_data_mesh, shard_batch

    config = _moco_v2_config(root, batch, cores, resize)
    mesh = make_data_mesh(1)
    views = StreamingViews(mesh, get_builder(config.dataset.name, None), config)

    def hand_off(crops):
        jax.block_until_ready(jax.tree.map(lambda rows: shard_batch(mesh, rows), crops))
        return len(crops[0])

    batches = views._epoch_batches(0, 0)
    return _timed(batches, views.steps_per_epoch, hand_off, lambda: 0.0)


class _TwoCrops:
    """MoCo's ``TwoCropsTransform``: the same transform applied twice."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image), self.transform(image)]


def time_official(root: str, cores: int, batch: int, resize: str = "") -> dict[str, Any]:
    """Two-view images/sec of the official MoCo input on ``cores`` (see the module docstring)."""
    del resize  # PIL's, always on the host
    import torch
    from torchvision import datasets, transforms

    torch.set_num_threads(cores)
    torch.manual_seed(0)
    augmentation = transforms.Compose(
        [
            transforms.RandomResizedCrop(SIZE, scale=SCALE),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    dataset = datasets.ImageFolder(os.path.join(root, "train"), _TwoCrops(augmentation))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=cores, drop_last=True
    )

    def hand_off(item):
        (crops_q, crops_k), _ = item
        return len(crops_q)

    batches = iter(loader)
    workers = batches._workers
    return _timed(batches, len(loader), hand_off, lambda: sum(map(_cpu_seconds, workers)))


def _cpu_seconds(process) -> float:
    """User + system CPU seconds of a live child process so far (``/proc/PID/stat``)."""
    with open(f"/proc/{process.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(batches, count, hand_off, children_cpu) -> dict[str, Any]:
    """Wall and CPU seconds of batches 2 to ``count`` (the iterator is not exhausted: the
    DataLoader's workers stay up to be read); CPU: this process's threads plus
    ``children_cpu()`` (the workers)."""
    start = time.perf_counter()
    hand_off(next(batches))
    first, cpu = time.perf_counter(), time.process_time() + children_cpu()
    images = sum(hand_off(next(batches)) for _ in range(count - 1))
    cpu = time.process_time() + children_cpu() - cpu
    seconds = time.perf_counter() - first
    return {
        "images": images,
        "seconds": seconds,
        "images_per_sec": images / seconds,
        "cpu_seconds": cpu,
        "images_per_cpu_sec": images / cpu,
        "first_batch_s": first - start,
    }


def time_pieces(root: str, cores: int, batch: int, resize: str = "host") -> dict[str, Any]:
    from benchmarks.host_pieces import time_pieces

    return time_pieces(root, cores, batch, resize)


SIDES = {"ours": time_ours, "official": time_official, "pieces": time_pieces}


def run_side(request: dict[str, Any]) -> dict[str, Any]:
    """One side in this (fresh) process: ``{"side", "cpus", "root", "batch", "resize"}``."""
    pin(request["cpus"])
    cores = len(request["cpus"])
    args = (request["root"], cores, request["batch"], request.get("resize", "host"))
    return {**SIDES[request["side"]](*args), "side": request["side"], "cores": cores}
