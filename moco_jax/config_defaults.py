"""Every config field, its default and what it means. Config files start from ``base_config``.

Fields (override any from the command line, e.g. ``--config.moco.queue_size=4096``):

- ``seed``: PRNG seed of initialisation, queue and key shuffling.
- ``batch_size``: global batch (all devices together); ``optim.base_lr`` is scaled by it / 256.
- ``epochs``: length of training; the lr schedule is per epoch.
- ``num_devices``: devices of the data mesh; 0 uses all visible devices.
- ``dataset.name`` / ``dataset.data_dir``: TFDS dataset name and directory (None = TFDS default).
- ``dataset.image_size`` / ``dataset.num_channels``: training image shape ``[S, S, C]``.
- ``dataset.download``: let TFDS download and prepare a missing dataset (offline machines
  prepare ``fashion_mnist`` from the Debian package's files either way).
- ``dataset.max_train_examples`` / ``dataset.max_test_examples``: use only the first N examples of
  each split per process (0 = all): quick experiments and smoke tests.
- ``dataset.mean`` / ``dataset.std``: per-channel normalisation (of images in [0, 1]).
- ``augment.crop``: random-resized-crop on device (False when the host already cropped);
  ``augment.crop_scale`` / ``augment.crop_ratio``: its area fraction and aspect-ratio ranges.
- ``augment.flip``: horizontal flip with p=0.5.
- ``augment.jitter``: colour-jitter strengths (brightness, contrast, saturation, hue), applied
  with probability ``augment.jitter_prob`` in a random order per example.
- ``augment.grayscale_prob``; ``augment.grayscale_before_jitter`` (MoCo v1's order) or after.
- ``augment.blur_prob`` / ``augment.solarize_prob``: (query view, key view) probabilities of
  Gaussian blur (sigma in ``augment.blur_sigma``) and solarisation.
- ``model.backbone``: registered backbone name (``resnet18``, ``resnet34``, ``resnet50``, ``mlp``).
- ``model.width_multiplier``: channels of the first stage = 64 x this (0.25 -> 16).
- ``model.cifar_stem``: 3x3 stride-1 first conv and no max-pool (small images).
- ``model.head``: ``linear`` (MoCo v1) or ``mlp`` (MoCo v2).
- ``model.dim``: dimension of the keys/queries (128).
- ``model.bn_mode``: ``shuffle`` (Shuffle-BN across devices), ``sync`` (global-batch BN
  statistics) or ``local`` (per-device statistics, no shuffling).
- ``model.bn_group_size``: samples per BN group within a device (0 = the whole per-device batch);
  e.g. 32 with a batch of 256 on one device gives the official demo's 8 groups. Not with ``sync``.
- ``model.dtype``: compute dtype, ``float32`` or ``bfloat16`` (params and BN stats stay float32).
- ``moco.queue_size`` (K), ``moco.momentum`` (m of the key encoder), ``moco.temperature`` (T).
- ``optim.base_lr``: learning rate per 256 images; ``optim.momentum``; ``optim.weight_decay``
  (coupled, on all parameters, as ``torch.optim.SGD``); ``optim.schedule``: ``cosine``, ``step``
  or ``constant``; ``optim.lr_milestones``: epochs at which ``step`` multiplies the lr by 0.1.
- ``knn.every_epochs``: kNN monitor period (and always after the last epoch); ``knn.k`` and
  ``knn.temperature``: neighbours and vote temperature (200 and 0.1 as the official demo).
- ``checkpoint.every_steps``: save period in steps (0 = only at epoch ends; a save also follows
  every epoch, and SIGTERM saves the current step before the run stops);
  ``checkpoint.keep``: how many recent checkpoints stay on disk;
  ``checkpoint.keep_every_steps``: also save, and keep for good, every checkpoint whose step is a
  multiple of this (0 = none). Checkpoints live in ``<workdir>/checkpoints``; rerunning with the
  same workdir resumes from the newest intact one (see ``moco_jax/checkpointing.py``).
- ``log_every_steps``: how often step metrics are fetched, logged and written.
- ``init_from``: a workdir, checkpoints directory or one step's directory of another run; a run
  that has no checkpoint of its own starts with that run's encoder weights (backbone, and the head
  if its shapes agree) in both encoders, with a fresh optimizer, queue and step. How fine-tuning
  and linear evaluation start from pretraining, and how a run with another K or dim reuses one.
  Such a run's baselines add the loaded weights' kNN (``init_from_knn_*``) beside the random
  init's. None = random initialisation.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """MoCo v1 on ImageNet with the paper's hyper-parameters; other configs edit a copy."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 256
    config.epochs = 200
    config.num_devices = 0

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "imagenet2012"
    config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
    config.dataset.image_size = 224
    config.dataset.num_channels = 3
    config.dataset.download = True
    config.dataset.max_train_examples = 0
    config.dataset.max_test_examples = 0

    config.dataset.mean = (0.485, 0.456, 0.406)
    config.dataset.std = (0.229, 0.224, 0.225)

    # MoCo v1's augmentation (main_moco.py without --aug-plus).
    config.augment = ml_collections.ConfigDict()
    config.augment.crop = True
    config.augment.crop_scale = (0.2, 1.0)
    config.augment.crop_ratio = (3 / 4, 4 / 3)
    config.augment.flip = True
    config.augment.jitter = (0.4, 0.4, 0.4, 0.4)
    config.augment.jitter_prob = 1.0
    config.augment.grayscale_prob = 0.2
    config.augment.grayscale_before_jitter = True
    config.augment.blur_prob = (0.0, 0.0)
    config.augment.blur_sigma = (0.1, 2.0)
    config.augment.solarize_prob = (0.0, 0.0)

    config.model = ml_collections.ConfigDict()
    config.model.backbone = "resnet50"
    config.model.width_multiplier = 1.0
    config.model.cifar_stem = False
    config.model.head = "linear"
    config.model.dim = 128
    config.model.bn_mode = "shuffle"
    config.model.bn_group_size = 0
    config.model.dtype = "float32"

    config.moco = ml_collections.ConfigDict()
    config.moco.queue_size = 65536
    config.moco.momentum = 0.999
    config.moco.temperature = 0.07

    config.optim = ml_collections.ConfigDict()
    config.optim.base_lr = 0.03
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-4
    config.optim.schedule = "step"
    config.optim.lr_milestones = (120, 160)

    config.knn = ml_collections.ConfigDict()
    config.knn.every_epochs = 10
    config.knn.k = 200
    config.knn.temperature = 0.1

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3
    config.checkpoint.keep_every_steps = 0

    config.log_every_steps = 50
    config.init_from = ml_collections.config_dict.placeholder(str)
    return config
