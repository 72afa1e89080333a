"""A PyTorch epoch as the official code trains it: ``DataLoader`` workers, PIL augmentation.

Optional (needs torch and torchvision); used by ``python -m benchmarks.epoch --torch``.
The pipeline is the official ``main_moco.py`` one, re-stated: a dataset of PIL images, the
augmentation applied twice per image (``TwoCropsTransform``) in ``DataLoader`` worker processes,
``shuffle=True, drop_last=True``, then the official step (``benchmarks.torch_reference``: same
architecture, BN groups, K, m, T and SGD as the JAX run) on one device, channels-last.
Augmentations are torchvision's, built from ``config.augment``: random-resized-crop, flip,
colour jitter with its probability, grayscale (before or after jitter), and per view Gaussian
blur (PIL's ``ImageFilter.GaussianBlur`` with sigma ~ U(blur_sigma), as MoCo v2) and solarize.

The time runs from asking the loader for its first batch (worker start-up included) to the last
step's end; ``steady_images_per_sec`` leaves out the first ``WARM_STEPS`` steps.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

WARM_STEPS = 5


def _gaussian_blur(sigma_range: tuple[float, float]):
    from PIL import ImageFilter

    def blur(image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*sigma_range)))

    return blur


def make_view_transform(config: Any, view: int):
    """torchvision transform of one view (0 = query, 1 = key) from ``config.augment``."""
    from torchvision import transforms as T

    aug, size = config.augment, config.dataset.image_size
    steps = []
    if aug.crop:
        steps.append(T.RandomResizedCrop(size, scale=tuple(aug.crop_scale), ratio=aug.crop_ratio))
    if aug.flip:
        steps.append(T.RandomHorizontalFlip())
    colour = [T.RandomApply([T.ColorJitter(*aug.jitter)], p=aug.jitter_prob)]
    gray = [T.RandomGrayscale(p=aug.grayscale_prob)]
    steps += gray + colour if aug.grayscale_before_jitter else colour + gray
    if aug.blur_prob[view] > 0:
        blur = T.Lambda(_gaussian_blur(tuple(aug.blur_sigma)))
        steps.append(T.RandomApply([blur], p=aug.blur_prob[view]))
    if aug.solarize_prob[view] > 0:
        steps.append(T.RandomSolarize(128, p=aug.solarize_prob[view]))
    steps += [T.ToTensor(), T.Normalize(tuple(config.dataset.mean), tuple(config.dataset.std))]
    return T.Compose(steps)


class TwoViewDataset:
    """uint8 ``[N, H, W, C]`` images served as PIL images, each returned as (query, key) views."""

    def __init__(self, images: np.ndarray, transform_q, transform_k):
        self.images, self.transform_q, self.transform_k = images, transform_q, transform_k

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        image = self.images[index]
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return self.transform_q(image), self.transform_k(image)


def time_torch_epoch(
    config: Any, steps: int = 0, workers: int = 2, threads: int = 0, log=print
) -> dict[str, Any]:
    """Train ``steps`` steps (0: one epoch) of the official pipeline; seconds and images/sec."""
    try:
        import torch
        import torchvision
    except ImportError as err:
        raise ImportError(
            f"the PyTorch epoch needs torch and torchvision ({err}); install both, e.g. "
            f"pip install torch torchvision"
        ) from err
    from benchmarks.torch_reference import build_for_training, cosine_learning_rate, train_step
    from moco_jax.data.tfds_source import RESIDENT_DATASETS, load_arrays, prepared_builder
    from moco_jax.optim import scaled_learning_rate

    dataset = config.dataset
    if dataset.name not in RESIDENT_DATASETS:
        raise ValueError(f"the PyTorch epoch reads in-memory datasets only, not {dataset.name}")
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    builder = prepared_builder(dataset.name, dataset.data_dir, dataset.download)
    images, _ = load_arrays(builder, "train", dataset.max_train_examples)
    batch = config.batch_size
    loader = torch.utils.data.DataLoader(
        TwoViewDataset(images, make_view_transform(config, 0), make_view_transform(config, 1)),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=False,
    )
    steps = min(steps or len(loader), len(loader))
    lr = cosine_learning_rate(scaled_learning_rate(config.optim, batch), 0, config.epochs)
    model, optimizer, criterion, _ = build_for_training(config, batch, lr)
    log(f"PyTorch {torch.__version__}: {steps} steps, {workers} DataLoader workers ...")
    start = time.perf_counter()
    warm_end = None
    for step, (im_q, im_k) in enumerate(loader):
        if step == steps:
            break
        if step == WARM_STEPS:
            warm_end = time.perf_counter()
        im_q = im_q.contiguous(memory_format=torch.channels_last)
        im_k = im_k.contiguous(memory_format=torch.channels_last)
        loss = train_step(model, optimizer, criterion, im_q, im_k, torch.randperm(batch), lr)
    end = time.perf_counter()
    epoch_s, steady = end - start, steps - WARM_STEPS
    return {
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "workers": workers,
        "channels_last": True,
        "steps": steps,
        "epoch_s": epoch_s,
        "images_per_sec": steps * batch / epoch_s,
        "steady_images_per_sec": (
            steady * batch / (end - warm_end) if warm_end and steady > 0 else None
        ),
        "last_loss": loss,
    }
