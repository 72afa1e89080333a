"""Up-front config checks: a clear, specific error before anything is compiled.

ml_collections already refuses a value of another type than the default's, from the command line
(``--config.batch_size=abc``), a config file, or a saved run's config.json (``saved_run`` assigns
each saved value onto the defaults): a string or float for an int, an int or string for a bool, a
number for a string, a scalar for a tuple. What it lets through is checked here: None, a bool
for a number (a bool is an int), a tuple's items, NaN and infinity; then every field's range,
and the rules that tie fields together (K >= global batch, batch divisible by the devices, BN
groups, image size and width vs. the backbone's shape (``shape_rules``), kNN k vs. the training
subset).
``validate`` runs everything once, in order (the devices asked for, these rules, one
normalisation mean and std per channel): ``moco_jax.assemble`` calls it before the mesh is made.
Rules that need the data (channels, image size without cropping, dataset size) are in
``run_setup``.
"""

from __future__ import annotations

import re
from typing import Any

from etils import epath

from moco_jax import storage
from moco_jax.algorithms import available_algorithms
from moco_jax.config.batch_rules import check_shuffle_bn
from moco_jax.config.checks import (  # noqa: F401 - ConfigError is this module's API too
    ConfigError,
    are_numbers,
    check_flag,
    check_int_at_least,
    check_number,
    check_probability,
    check_range_pair,
    is_bool,
    is_int,
    is_number,
    require,
)
from moco_jax.config.shape_rules import check_model_shapes
from moco_jax.config.user_modules import import_user_modules
from moco_jax.data.folder_source import folder_root, is_folder
from moco_jax.models import BN_MODES, DTYPES, available_backbones
from moco_jax.models.heads import HEAD_NAMES, V3_HEADS
from moco_jax.storage import is_remote

SCHEDULES = ("cosine", "step", "constant", "warmup_cosine")
OPTIMIZERS = ("sgd", "lars", "adamw")
BASELINES = ("auto", "on", "off")  # knn.baselines (run/startup.py)
# Files init_from reads as weights: official MoCo checkpoints, torchvision state dicts (torch
# files) and detectron2 pickles of the official converter.
WEIGHT_FILE_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar", ".pkl")
# TFDS names: a builder, optionally /config, optionally :version (no paths).
TFDS_NAME = re.compile(r"[a-z0-9][a-z0-9_]*(/[a-z0-9_.-]+)?(:[0-9]+(\.[0-9*]+){0,2})?")


def _validate_data_fields(config: Any) -> None:
    """``seed``, ``num_devices``, ``dataset.*`` and ``augment.*``."""
    dataset, aug = config.dataset, config.augment
    check_int_at_least("seed", config.seed, 0)
    require(
        config.seed < 2**31,
        f"seed must be < 2**31, got {config.seed} (the input pipelines derive 64-bit seeds "
        f"from it)",
    )
    check_int_at_least("num_devices", config.num_devices, 0)
    folder = is_folder(dataset.name)
    require(
        folder or (isinstance(dataset.name, str) and TFDS_NAME.fullmatch(dataset.name)),
        f"dataset.name must be a TFDS dataset name, got {dataset.name!r} (e.g. fashion_mnist, "
        f"imagenet2012 or imagenet2012:5.1.0), or folder:PATH for a folder of images",
    )
    require(
        not folder or folder_root(dataset.name),
        "dataset.name folder: needs the folder's path, e.g. folder:/data/imagenet",
    )
    require(
        dataset.data_dir is None or dataset.data_dir != "",
        f"dataset.data_dir must be a directory (or None for the TFDS default), "
        f"got {dataset.data_dir!r}",
    )
    check_flag("dataset.download", dataset.download)
    check_int_at_least("dataset.max_train_examples", dataset.max_train_examples, 0)
    check_int_at_least("dataset.max_test_examples", dataset.max_test_examples, 0)
    check_int_at_least("dataset.host_threads", dataset.host_threads, 0)
    where, side, least = dataset.resize_on, dataset.union_buffer, 2 * dataset.image_size
    message = f"dataset.resize_on must be 'host' or 'device', got {where!r}"
    require(where in ("host", "device"), message)
    require(
        where == "host" or (is_int(side) and side >= least),
        f"dataset.union_buffer must be an integer >= 2 x dataset.image_size ({least}: it carries "
        f"two views side by side), got {side!r}",
    )
    for name, value in [("dataset.mean", dataset.mean), ("dataset.std", dataset.std)]:
        require(are_numbers(value), f"{name} must be a tuple of numbers, got {value!r}")
    require(all(s > 0 for s in dataset.std), f"dataset.std must be > 0, got {tuple(dataset.std)!r}")

    check_flag("augment.crop", aug.crop)
    check_range_pair("augment.crop_scale", aug.crop_scale, 1.0, "area fraction")
    check_range_pair("augment.crop_ratio", aug.crop_ratio, None, "aspect ratio")
    check_flag("augment.flip", aug.flip)
    jitter = aug.jitter
    require(
        are_numbers(jitter, 4) and all(v >= 0 for v in jitter) and jitter[3] <= 0.5,
        "augment.jitter must be 4 strengths (brightness, contrast, saturation, hue), each >= 0 "
        f"and hue <= 0.5, got {tuple(jitter) if isinstance(jitter, list) else jitter!r}",
    )
    check_probability("augment.jitter_prob", aug.jitter_prob)
    check_probability("augment.grayscale_prob", aug.grayscale_prob)
    check_flag("augment.grayscale_before_jitter", aug.grayscale_before_jitter)
    for name, value in [
        ("augment.blur_prob", aug.blur_prob),
        ("augment.solarize_prob", aug.solarize_prob),
    ]:
        require(
            are_numbers(value, 2) and all(0.0 <= v <= 1.0 for v in value),
            f"{name} must be two probabilities in [0, 1] (query view, key view), got {value!r}",
        )
    check_range_pair("augment.blur_sigma", aug.blur_sigma, None, "Gaussian sigma")


def _validate_run_fields(config: Any) -> None:
    """``optim.lr_milestones``, ``knn.*``, ``checkpoint.*``, ``log_every_steps``, ``profile_*``,
    ``init_from``."""
    milestones = config.optim.lr_milestones
    require(
        isinstance(milestones, (tuple, list))
        and all(is_int(m) and m >= 1 for m in milestones)
        and list(milestones) == sorted(set(milestones)),
        f"optim.lr_milestones must be increasing epochs >= 1, got {milestones!r}",
    )
    knn = config.knn
    check_int_at_least("knn.every_epochs", knn.every_epochs, 1)
    check_int_at_least("knn.k", knn.k, 1)
    check_number("knn.temperature", knn.temperature, ">")
    if "show" in config:  # the pictures (run.show); a linear config has none
        check_flag("show.at_end", config.show.at_end)
        check_int_at_least("show.queries", config.show.queries, 1)
        check_int_at_least("show.neighbours", config.show.neighbours, 1)
        check_int_at_least("show.map_points", config.show.map_points, 10)
        check_int_at_least("show.seed", config.show.seed, 0)
    require(
        knn.baselines in BASELINES,
        f"knn.baselines must be one of {list(BASELINES)}, got {knn.baselines!r}",
    )
    checkpoint = config.checkpoint
    check_int_at_least("checkpoint.every_steps", checkpoint.every_steps, 0)
    check_int_at_least("checkpoint.keep", checkpoint.keep, 1)
    check_int_at_least("checkpoint.keep_every_steps", checkpoint.keep_every_steps, 0)
    check_int_at_least("log_every_steps", config.log_every_steps, 1)
    check_int_at_least("profile_steps", config.profile_steps, 0)
    check_int_at_least("profile_first_step", config.profile_first_step, 1)
    init_from = config.init_from
    require(
        init_from is None or init_from.strip() != "",
        f"init_from must be a path to another run's checkpoints (or None), got {init_from!r}",
    )
    if init_from is not None:  # a FIFO would block its reader, /dev/zero fill memory
        storage.check_input(init_from, "init_from")
    require(
        init_from is None
        or is_remote(init_from)  # a bucket is not asked before the run (storage.py)
        or not epath.Path(init_from).is_file()
        or init_from.endswith(WEIGHT_FILE_SUFFIXES),
        f"init_from must be another run's workdir, checkpoints directory or step directory, "
        f"or a weights file ({', '.join(WEIGHT_FILE_SUFFIXES)}), got the file "
        f"{init_from!r}",
    )


def validate(config: Any, visible_devices: int) -> int:
    """Every rule that needs no data, for a run on this process's ``visible_devices``, in the
    order that names the real cause first; returns the number of devices of the run's mesh."""
    _validate_devices(config, visible_devices)
    num_devices = config.num_devices or visible_devices
    validate_config(config, num_devices)
    _validate_channels(config)
    return num_devices


def validate_run_config(config: Any, visible_devices: int) -> None:
    """The rules of a whole run that building a step does not need: ``num_devices`` against the
    devices this process sees, and one normalisation mean and std per image channel."""
    _validate_devices(config, visible_devices)
    _validate_channels(config)


def _validate_devices(config: Any, visible_devices: int) -> None:
    check_int_at_least("num_devices", config.num_devices, 0)
    require(
        config.num_devices <= visible_devices,
        f"num_devices is {config.num_devices} but only {visible_devices} device(s) are visible "
        f"(0 uses all of them)",
    )


def _validate_channels(config: Any) -> None:
    dataset = config.dataset
    channels = dataset.num_channels
    for name, value in [("dataset.mean", dataset.mean), ("dataset.std", dataset.std)]:
        require(
            are_numbers(value) and (not is_int(channels) or len(value) == channels),
            f"{name} must hold one number per channel (dataset.num_channels={channels!r}), "
            f"got {value!r}",
        )


def validate_config(config: Any, num_devices: int) -> None:
    """Raise ``ConfigError`` naming the first field that is wrong for a run on ``num_devices``
    (after importing the fork's modules of ``config.imports``: they register its names)."""
    import_user_modules(config)
    for name, value in [
        ("batch_size", config.batch_size),
        ("epochs", config.epochs),
        ("model.dim", config.model.dim),
        ("moco.queue_size", config.moco.queue_size),
        ("dataset.image_size", config.dataset.image_size),
        ("dataset.num_channels", config.dataset.num_channels),
    ]:
        require(is_int(value) and value >= 1, f"{name} must be a positive integer, got {value!r}")
    _validate_data_fields(config)
    _validate_model_fields(config)
    _validate_run_fields(config)
    _validate_cross_field_rules(config, num_devices)
    if config.algorithm == "linear":
        _validate_linear_fields(config)


def _validate_linear_fields(config: Any) -> None:
    """``linear.*`` (a linear config: ``config_defaults.linear_config``)."""
    require("linear" in config, "algorithm 'linear' needs a linear section (linear_config())")
    linear = config.linear
    check_int_at_least("linear.num_classes", linear.num_classes, 2)
    check_int_at_least("linear.eval_every_epochs", linear.eval_every_epochs, 1)
    check_number("linear.init_std", linear.init_std, ">")
    check_flag("linear.cached_features", linear.cached_features)
    check_flag("linear.train_backbone", linear.train_backbone)
    check_number("linear.backbone_lr", linear.backbone_lr, ">=")
    if linear.train_backbone:
        require(
            not linear.cached_features,
            "linear.cached_features and linear.train_backbone exclude each other: fine-tuning "
            "changes the features",
        )
        require(
            linear.backbone_lr > 0,
            "linear.train_backbone needs linear.backbone_lr > 0 (the backbone's lr per 256)",
        )
        require(
            config.model.bn_mode != "shuffle",
            "fine-tuning has no keys to shuffle: set model.bn_mode to 'sync' or 'local'",
        )


def _validate_model_fields(config: Any) -> None:
    """``algorithm``, ``model.*``, ``moco.*`` and ``optim.*`` (but the milestones)."""
    m, moco, optim = config.model, config.moco, config.optim
    require(
        config.algorithm in available_algorithms(),
        f"algorithm must be one of {available_algorithms()}, got {config.algorithm!r} (a fork's "
        "algorithm registers when its module is imported: --config.imports=MODULE)",
    )
    check_flag("model.cifar_stem", m.cifar_stem)
    require(
        is_int(m.bn_group_size) and m.bn_group_size >= 0,
        f"model.bn_group_size must be an integer >= 0, got {m.bn_group_size!r}",
    )
    require(
        m.backbone in available_backbones(),
        f"model.backbone: unknown backbone {m.backbone!r}; available: "
        + ", ".join(available_backbones())
        + " (a fork's backbone registers when its module is imported: --config.imports=MODULE)",
    )
    require(m.head in HEAD_NAMES, f"model.head must be one of {list(HEAD_NAMES)}, got {m.head!r}")
    require(m.dtype in DTYPES, f"model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}")
    require(
        m.bn_mode in BN_MODES, f"model.bn_mode must be one of {list(BN_MODES)}, got {m.bn_mode!r}"
    )
    require(
        is_number(m.width_multiplier) and round(64 * m.width_multiplier) >= 1,
        f"model.width_multiplier must give at least one channel (64 x it >= 1), "
        f"got {m.width_multiplier!r}",
    )
    check_number("moco.temperature", moco.temperature, ">")
    require(
        is_number(moco.momentum) and 0.0 <= moco.momentum <= 1.0,
        f"moco.momentum must be in [0, 1], got {moco.momentum!r}",
    )
    check_number("optim.base_lr", optim.base_lr, ">")
    check_number("optim.weight_decay", optim.weight_decay, ">=")
    require(
        is_number(optim.momentum) and 0.0 <= optim.momentum < 1.0,
        f"optim.momentum must be in [0, 1), got {optim.momentum!r}",
    )
    require(
        optim.schedule in SCHEDULES,
        f"optim.schedule must be one of {list(SCHEDULES)}, got {optim.schedule!r}",
    )
    _validate_v3_fields(config)


def _validate_v3_fields(config: Any) -> None:
    """The fields MoCo v3 added (optimizers, warm-up, momentum schedule, v3 heads) and which
    algorithm each belongs to. A config saved before them (a workdir's config.json) reads
    with their defaults (``saved_run.with_defaults``)."""
    m, moco, optim = config.model, config.moco, config.optim
    algorithm = config.algorithm
    name, warmup = optim.name, optim.warmup_epochs
    require(name in OPTIMIZERS, f"optim.name must be one of {list(OPTIMIZERS)}, got {name!r}")
    betas = optim.betas
    require(
        are_numbers(betas, 2) and all(0.0 <= b < 1.0 for b in betas),
        f"optim.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {betas!r}",
    )
    check_int_at_least("optim.warmup_epochs", warmup, 0)
    if optim.schedule == "warmup_cosine":
        require(
            warmup < config.epochs,
            f"optim.warmup_epochs ({warmup}) must be < epochs ({config.epochs}): the cosine "
            f"follows the warm-up",
        )
    momentum_cosine = moco.momentum_cosine
    check_flag("moco.momentum_cosine", momentum_cosine)
    mlp_dim = m.mlp_dim
    require(
        is_int(mlp_dim) and mlp_dim >= 1,
        f"model.mlp_dim must be a positive integer, got {mlp_dim!r}",
    )
    check_flag("model.zero_init_residual", m.zero_init_residual)
    check_flag("model.stop_grad_conv1", m.stop_grad_conv1)
    if algorithm == "moco_v3":
        require(
            m.head in V3_HEADS,
            f"algorithm 'moco_v3' needs a v3 projector: model.head must be one of "
            f"{list(V3_HEADS)}, got {m.head!r}",
        )
        require(
            m.bn_mode != "shuffle",
            "algorithm 'moco_v3' has no Shuffle-BN: set model.bn_mode to 'sync' (the official "
            "SyncBN) or 'local'",
        )
        return
    require(
        name == "sgd",
        f"optim.name {name!r} is MoCo v3's: algorithm {algorithm!r} trains with 'sgd'",
    )
    require(
        not momentum_cosine,
        f"moco.momentum_cosine is MoCo v3's: algorithm {algorithm!r} keeps moco.momentum",
    )
    require(
        m.head not in V3_HEADS,
        f"model.head {m.head!r} is MoCo v3's projector: algorithm {algorithm!r} takes "
        f"{[h for h in HEAD_NAMES if h not in V3_HEADS]}",
    )


def _validate_cross_field_rules(config: Any, num_devices: int) -> None:
    """Rules that tie fields together, and the devices to the batch."""
    ordered = config.ordered_reductions
    check_flag("ordered_reductions", ordered)
    require(
        not ordered or (config.algorithm == "moco" and config.model.bn_mode != "sync"),
        f"ordered_reductions is for MoCo v1/v2 (algorithm 'moco') with bn_mode 'shuffle' or "
        f"'local', got algorithm {config.algorithm!r} with bn_mode {config.model.bn_mode!r} "
        f"(synchronised BN and the other steps all-reduce inside the model)",
    )
    m, moco = config.model, config.moco
    require(num_devices >= 1, f"need at least one device, got {num_devices}")
    require(
        config.batch_size % num_devices == 0,
        f"batch_size {config.batch_size} is not divisible by the {num_devices} devices",
    )
    symmetric = moco.symmetric
    enqueued = config.batch_size * (2 if symmetric else 1)
    require(
        config.algorithm == "moco_v3" or moco.queue_size >= enqueued,
        f"moco.queue_size (K={moco.queue_size}) must be >= the {enqueued} keys each step "
        f"enqueues ({'both views of ' if symmetric else ''}the global batch_size)",
    )
    per_device = config.batch_size // num_devices
    check_shuffle_bn(m, config.batch_size, num_devices)
    if m.bn_mode == "sync":
        require(
            m.bn_group_size == 0,
            "model.bn_group_size must be 0 with bn_mode 'sync' (statistics span the global batch)",
        )
    if m.bn_group_size:
        require(
            per_device % m.bn_group_size == 0,
            f"model.bn_group_size {m.bn_group_size} does not divide the per-device batch "
            f"{per_device} (batch_size {config.batch_size} / {num_devices} devices)",
        )
    check_model_shapes(config)  # image size vs. the ResNet's stride or the ViT's patch, ViT width
    max_train = config.dataset.max_train_examples
    if max_train:
        require(
            config.knn.k <= max_train,
            f"knn.k ({config.knn.k}) must be <= dataset.max_train_examples ({max_train}): "
            f"the kNN memory bank is the training set",
        )
