"""Every config field, its default and what it means; config files start from ``base_config``.

The defaults are MoCo v1 on ImageNet with the paper's hyper-parameters. Override any field from
the command line (``--config.moco.queue_size=4096``): ml_collections refuses a value of another
type there (``--config.batch_size=abc``), and ``moco_jax.config.validation`` checks ranges and
the rules that tie fields together before anything is built.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
    """MoCo v1 on ImageNet with the paper's hyper-parameters; other configs edit a copy."""
    config = ml_collections.ConfigDict()
    # registered algorithm: "moco" is v1/v2 (queue + momentum encoder), "moco_v3" is MoCo v3
    # (no queue; predictor, symmetric loss, momentum schedule: moco_jax/algorithms/moco_v3.py)
    config.algorithm = "moco"
    config.seed = 0  # PRNG seed of initialisation, queue, key shuffling and data order
    config.batch_size = 256  # global batch (all devices together); base_lr is scaled by it / 256
    config.epochs = 200  # length of training; the lr schedule is per epoch
    config.num_devices = 0  # devices of the data mesh; 0 uses every visible device
    # Means over devices (gradients, loss, BN statistics, metrics) added in device order: the
    # same bits for any split of the devices into processes (2 hosts x 4 = 1 host x 8), for ~1.5x
    # the bytes of an all-reduce. False: XLA's all-reduce, equal up to float rounding.
    config.ordered_reductions = False

    config.dataset = dataset = ml_collections.ConfigDict()
    # A TFDS name (small ones, fashion_mnist or cifar10, stay on device), or folder:PATH, a
    # folder of images PATH/<split>/<class>/<image> (splits train and val or test), streamed.
    dataset.name = "imagenet2012"
    dataset.data_dir = placeholder(str)  # TFDS data directory (local or gs://); None: its default
    dataset.image_size = 224  # training images are [S, S, C] ...
    dataset.num_channels = 3  # ... with C channels
    dataset.download = True  # let TFDS download/prepare a missing dataset (Fashion-MNIST: offline)
    # First N examples (0: all) of the split, each process reading its share, for datasets kept
    # on the devices; for streamed ones, the kNN monitor's first N of each process's share.
    dataset.max_train_examples = 0
    dataset.max_test_examples = 0
    # Streamed datasets: threads of the host's decoding (tf.data's private thread pool); 0: one
    # per core this process may use. Set it below the core count only to leave cores to other
    # work on the host (README, "Feeding the chips").
    dataset.host_threads = 0
    # Streamed datasets: where each view's crop window is resized to S x S. "host": in tf.data
    # (the host sends S x S crops); "device": the host only decodes, and sends each image's
    # union of windows padded into a union_buffer x union_buffer square that the accelerators
    # resize: the same views within one grey level, ~2.5x the images per host core, ~4x the
    # bytes to the device, ~10% more FLOPs there (README, "Feeding the chips"). Unions larger
    # than the buffer (~3% of ImageNet-like images at 640) are resized on the host either way;
    # the buffer must hold two views side by side, >= 2 x image_size.
    dataset.resize_on = "host"
    dataset.union_buffer = 640
    dataset.mean = (0.485, 0.456, 0.406)  # per-channel normalisation of images in [0, 1]
    dataset.std = (0.229, 0.224, 0.225)

    # MoCo v1's augmentation (main_moco.py without --aug-plus), torchvision semantics.
    config.augment = aug = ml_collections.ConfigDict()
    aug.crop = True  # random-resized-crop on device (False: the host already cropped)
    aug.crop_scale = (0.2, 1.0)  # area fraction range of the crop
    aug.crop_ratio = (3 / 4, 4 / 3)  # aspect-ratio range of the crop (log-uniform)
    aug.flip = True  # horizontal flip with p=0.5
    aug.jitter = (0.4, 0.4, 0.4, 0.4)  # colour jitter: brightness, contrast, saturation, hue
    aug.jitter_prob = 1.0  # probability of the jitter (ops in random order per example)
    aug.grayscale_prob = 0.2  # random grayscale (a no-op on one channel)
    aug.grayscale_before_jitter = True  # MoCo v1's order; False: jitter first (v2)
    aug.blur_prob = (0.0, 0.0)  # Gaussian blur probability, (query view, key view)
    aug.blur_sigma = (0.1, 2.0)  # blur sigma ~ U(min, max)
    aug.solarize_prob = (0.0, 0.0)  # solarisation at 0.5, (query view, key view)

    config.model = model = ml_collections.ConfigDict()
    model.backbone = "resnet50"  # registered backbone: resnet18, resnet34, resnet50, mlp
    model.width_multiplier = 1.0  # first-stage channels = round(64 x this) (0.25 -> 16)
    model.cifar_stem = False  # 3x3 stride-1 first conv and no max-pool (small images)
    # projection head: linear (v1) or mlp (v2); MoCo v3's BN MLPs as the official builds them
    # for each backbone family: v3_resnet (projector 2 layers, predictor 2 layers without a last
    # BN) or v3_vit (projector 3 layers, predictor 2 layers with a last BN)
    model.head = "linear"
    model.dim = 128  # dimension of keys and queries (MoCo v3's --moco-dim: 256)
    model.mlp_dim = 4096  # hidden width of the v3 projector and predictor (--moco-mlp-dim)
    model.zero_init_residual = False  # ResNet: last BN of each residual block starts at scale 0
    model.stop_grad_conv1 = False  # ViT: frozen random patch projection (MoCo v3 --stop-grad-conv1)
    model.bn_mode = "shuffle"  # shuffle (Shuffle-BN), sync (global-batch stats) or local
    # samples per BN group within a device (0: the whole per-device batch; but with bn_mode
    # shuffle on one device: 8 groups, as the official colab's --bn-splits 8; config/batch_rules)
    model.bn_group_size = 0
    # Shuffle-BN exchanges keys within groups of this many devices (0: all devices): 8 as the
    # official 8-GPU setup; the per-device batch must be a multiple of it (config/batch_rules)
    model.shuffle_group_devices = 8
    model.dtype = "float32"  # compute dtype, float32 or bfloat16 (params and BN stats float32)

    config.moco = moco = ml_collections.ConfigDict()
    moco.queue_size = 65536  # K, negatives in the queue (>= the global batch)
    moco.momentum = 0.999  # m of the key encoder's moving average
    moco.temperature = 0.07  # T of InfoNCE
    # v1/v2: the official colab's symmetric loss ctr(q1, k2) + ctr(q2, k1), both views' keys
    # enqueued (2 x batch per step; needs queue_size >= 2 x batch). MoCo v3 is always symmetric.
    moco.symmetric = False
    # MoCo v3 (--moco-m-cos): m rises per step from moco.momentum to 1 with a half-cycle cosine,
    # 1 - 0.5 (1 + cos(pi e / epochs)) (1 - m), e the fractional epoch
    moco.momentum_cosine = False

    config.optim = optim = ml_collections.ConfigDict()
    # sgd (v1/v2: torch.optim.SGD), lars (MoCo v3 ResNet: moco-v3's LARS, trust coefficient
    # 0.001, no decay or trust ratio on tensors with ndim <= 1) or adamw (MoCo v3 ViT)
    optim.name = "sgd"
    optim.base_lr = 0.03  # learning rate per 256 images (linear scaling rule)
    optim.momentum = 0.9  # SGD and LARS momentum
    # sgd: coupled, on every parameter, as torch.optim.SGD; lars: coupled, on ndim > 1 tensors;
    # adamw: decoupled (times the lr), on every trained tensor, as torch.optim.AdamW
    optim.weight_decay = 1e-4
    optim.betas = (0.9, 0.999)  # adamw: (beta1, beta2) of the moment averages (torch's defaults)
    # per-epoch lr: cosine, step or constant; per-step: warmup_cosine (linear warm-up from 0 over
    # optim.warmup_epochs, then a half-cycle cosine to 0: moco-v3's adjust_learning_rate)
    optim.schedule = "step"
    optim.lr_milestones = (120, 160)  # epochs at which "step" multiplies the lr by 0.1
    optim.warmup_epochs = 0  # warmup_cosine: epochs of linear warm-up (moco-v3: 10 R-50, 40 ViT)

    config.knn = knn = ml_collections.ConfigDict()
    knn.every_epochs = 10  # kNN monitor period in epochs (and always after the last one)
    knn.k = 200  # neighbours (the official demo's 200)
    knn.temperature = 0.1  # vote weight exp(similarity / t)
    # kNN of raw pixels and of the random-init encoder before training (what pretraining has to
    # beat; a pass over the training and test splits each): on, off, or auto: on unless the
    # training split is streamed and over 200,000 images (ImageNet; docs/evaluation.md)
    knn.baselines = "auto"

    # Pictures of what the features mean (``python -m moco_jax.evaluate show``; and after training):
    # neighbours.png (test images and their nearest training images by the kNN monitor's backbone
    # similarity) and embedding.png (t-SNE of the test features beside raw pixels; scikit-learn).
    config.show = show = ml_collections.ConfigDict()
    show.at_end = True  # both after training, for data kept on the devices (streamed: the command)
    show.queries = 12  # test images shown, drawn at random with show.seed
    show.neighbours = 8  # nearest training images per query
    show.map_points = 2000  # test images in the 2-D maps (t-SNE's time grows ~N log N)
    show.seed = 0

    # Checkpoints live in <workdir>/checkpoints; rerunning with the same workdir resumes from the
    # newest intact one. A save also follows every epoch, and SIGTERM saves before stopping.
    config.checkpoint = ckpt = ml_collections.ConfigDict()
    ckpt.every_steps = 1000  # save period in steps (0: only at epoch ends)
    ckpt.keep = 3  # how many recent checkpoints stay on disk
    ckpt.keep_every_steps = 0  # also save, and keep for good, every multiple of this (0: none)

    config.log_every_steps = 50  # how often step metrics are fetched, logged and written
    # A jax.profiler trace of profile_steps steps (0: none) after step profile_first_step, in
    # <workdir>/profile (TensorBoard's profile tab: tensorboard --logdir <workdir>/profile)
    config.profile_steps = 0
    config.profile_first_step = 10
    # Another run's workdir, checkpoints directory or step directory: a run without checkpoints
    # of its own starts from its encoder weights (backbone, and the head if shapes agree) in both
    # encoders, with a fresh optimizer, queue and step; its baselines add the loaded weights' kNN
    # (init_from_knn_*). None: random initialisation.
    config.init_from = placeholder(str)
    # A fork's modules (comma-separated, e.g. "my_pkg.my_backbone"), imported before the config
    # is checked: their @register_backbone / @register_algorithm add names (config.user_modules).
    config.imports = ""
    return config


def linear_config() -> ml_collections.ConfigDict:
    """Linear classification on frozen features with the official ``main_lincls.py`` protocol of
    MoCo v1/v2 (ImageNet, ResNet-50); run by ``python -m moco_jax.evaluate linear``."""
    config = base_config()
    config.algorithm = "linear"  # the protocol of moco_jax/algorithms/linear.py
    config.epochs = 100
    config.model.bn_mode = "sync"  # only fine-tuning computes batch statistics: over all devices
    config.augment.crop_scale = (0.08, 1.0)  # RandomResizedCrop(224) with torchvision's default
    config.augment.jitter_prob = 0.0  # ... and a horizontal flip, nothing else
    config.augment.grayscale_prob = 0.0
    config.optim.base_lr = 30.0  # per 256 images; SGD momentum 0.9
    config.optim.weight_decay = 0.0
    config.optim.schedule = "step"
    config.optim.lr_milestones = (60, 80)  # lr x0.1 at these epochs
    config.checkpoint.every_steps = 1000

    config.linear = linear = ml_collections.ConfigDict()
    # The pretrained encoder (--pretrained sets it): a pretraining workdir, checkpoints directory
    # or step directory, an official MoCo .pth.tar or a torchvision ResNet state dict. None: the
    # random-init encoder (a baseline). A workdir's model architecture replaces config.model's.
    linear.pretrained = placeholder(str)
    linear.num_classes = 1000  # classes of dataset.name (checked against the data)
    linear.init_std = 0.01  # classifier weight ~ N(0, init_std^2), bias 0
    linear.eval_every_epochs = 1  # test top-1/top-5 period in epochs (and after the last one)
    linear.cached_features = False  # True: features once, no augmentation; a faster protocol
    # (streamed data: read once, the features kept on the devices)
    linear.train_backbone = False  # True: fine-tune the whole encoder, BN in train mode
    linear.backbone_lr = 0.0  # fine-tuning: the backbone's lr per 256 images (same schedule)
    return config
