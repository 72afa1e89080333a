"""Bad configs fail with a specific message before any model is built or compiled."""

import jax
import pytest

import moco_jax
from moco_jax import ConfigError, validate_config
from moco_jax.algorithms import moco
from moco_jax.config.validation import validate_run_config
from tiny import tiny_config

V3 = {"algorithm": "moco_v3", "model.head": "v3_resnet", "model.bn_mode": "sync"}
BAD_VALUES = [
    ({"algorithm": "byol"}, 1, r"algorithm must be one of \['linear', 'moco', 'moco_v3'\], got"),
    ({"moco.queue_size": 32}, 1, r"queue_size \(K=32\) must be >= the 64 keys each step enqueues"),
    (
        {"moco.queue_size": 96, "moco.symmetric": True},
        1,
        r"queue_size \(K=96\) must be >= the 128 keys each step enqueues \(both views",
    ),
    ({"batch_size": 60}, 8, "batch_size 60 is not divisible by the 8 devices"),
    (
        {"model.backbone": "resnet9000"},
        1,
        # (a fork test in the same process may have registered its backbones first)
        "unknown backbone 'resnet9000'; available: .*mlp, pixels, resnet18",
    ),
    ({"model.bn_mode": "group"}, 1, r"model.bn_mode must be one of \['shuffle', 'sync', 'local'\]"),
    ({"moco.temperature": -0.1}, 1, "moco.temperature must be > 0, got -0.1"),
    ({"moco.temperature": 0.0}, 1, "moco.temperature must be > 0, got 0.0"),
    ({"moco.momentum": 1.5}, 1, r"moco.momentum must be in \[0, 1\], got 1.5"),
    ({"model.head": "transformer"}, 1, "model.head must be one of"),
    ({"model.dtype": "float16"}, 1, "model.dtype must be one of"),
    ({"optim.schedule": "linear"}, 1, "optim.schedule must be one of"),
    ({"optim.base_lr": 0.0}, 1, "optim.base_lr must be > 0"),
    ({"optim.weight_decay": -1e-4}, 1, "optim.weight_decay must be >= 0"),
    ({"model.dim": 0}, 1, "model.dim must be a positive integer, got 0"),
    ({"epochs": 0}, 1, "epochs must be a positive integer"),
    ({"model.width_multiplier": 0.001}, 1, "width_multiplier must give at least one channel"),
    ({"model.bn_group_size": 48}, 1, "bn_group_size 48 does not divide the per-device batch 64"),
    ({"model.bn_group_size": 16, "model.bn_mode": "sync"}, 8, "must be 0 with bn_mode 'sync'"),
    (
        {"batch_size": 32, "moco.queue_size": 64},
        8,
        r"per-device batch \(4\) must be divisible by 8",
    ),
    # Shuffle-BN in groups of devices, and on one device (config/batch_rules.py).
    (
        {"model.shuffle_group_devices": -1},
        8,
        "model.shuffle_group_devices must be an integer >= 0, got -1",
    ),
    (
        {"model.shuffle_group_devices": 3},
        8,
        "model.shuffle_group_devices 3 does not divide the 8 devices: set it to a divisor of 8",
    ),
    (
        {"model.shuffle_group_devices": 4, "batch_size": 48},
        8,
        r"to every device of its group of 4 .* per-device batch \(6\) must be divisible by 4",
    ),
    (
        {"batch_size": 40},
        1,
        r"bn_mode 'shuffle' on one device .* runs the keys' BatchNorm in 8 groups, as the "
        r"official colab's --bn-splits 8: the per-device batch \(40\) must be a multiple of 16",
    ),
    # Every other field of config_defaults.py: types (None, bools for numbers), ranges, shapes.
    ({"seed": -1}, 1, "seed must be an integer >= 0, got -1"),
    ({"seed": True}, 1, "seed must be an integer >= 0, got True"),
    ({"num_devices": -2}, 1, "num_devices must be an integer >= 0, got -2"),
    ({"ordered_reductions": None}, 1, "ordered_reductions must be True or False, got None"),
    (
        {"ordered_reductions": True, "model.bn_mode": "sync"},
        1,
        "ordered_reductions is for MoCo v1/v2 .* with bn_mode 'sync'",
    ),
    ({"batch_size": None}, 1, "batch_size must be a positive integer, got None"),
    ({"moco.queue_size": None}, 1, "moco.queue_size must be a positive integer, got None"),
    ({"dataset.name": ""}, 1, "dataset.name must be a TFDS dataset name, got ''"),
    ({"dataset.name": "folder:"}, 1, "dataset.name folder: needs the folder's path"),
    ({"dataset.data_dir": ""}, 1, "dataset.data_dir must be a directory"),
    ({"dataset.download": None}, 1, "dataset.download must be True or False, got None"),
    ({"dataset.image_size": 0}, 1, "dataset.image_size must be a positive integer, got 0"),
    ({"dataset.num_channels": None}, 1, "dataset.num_channels must be a positive integer"),
    (
        {"dataset.max_train_examples": -1},
        1,
        "dataset.max_train_examples must be an integer >= 0, got -1",
    ),
    ({"dataset.max_test_examples": -5}, 1, "dataset.max_test_examples must be an integer >= 0"),
    ({"dataset.mean": ("0.5",)}, 1, r"dataset.mean must be a tuple of numbers, got \('0.5',\)"),
    ({"dataset.std": (0.0,)}, 1, r"dataset.std must be > 0, got \(0.0,\)"),
    ({"augment.crop": None}, 1, "augment.crop must be True or False, got None"),
    (
        {"augment.crop_scale": (0.5, 0.2)},
        1,
        r"augment.crop_scale must be \(area fraction min, max\) with 0 < min <= max <= 1, "
        r"got \(0.5, 0.2\)",
    ),
    ({"augment.crop_scale": (0.2, 1.5)}, 1, "augment.crop_scale must be .* <= 1, got"),
    ({"augment.crop_scale": (0.2,)}, 1, r"augment.crop_scale must be .*got \(0.2,\)"),
    ({"augment.crop_ratio": (0.0, 1.0)}, 1, r"augment.crop_ratio must be \(aspect ratio min"),
    ({"augment.flip": None}, 1, "augment.flip must be True or False, got None"),
    ({"augment.jitter": (0.4, -0.1, 0.4, 0.1)}, 1, "augment.jitter must be 4 strengths"),
    ({"augment.jitter": (0.4, 0.4, 0.4, 0.6)}, 1, "each >= 0 and hue <= 0.5, got"),
    ({"augment.jitter": (0.4, 0.4, 0.4)}, 1, r"augment.jitter must be 4 strengths .*\(0.4, 0.4"),
    ({"augment.jitter_prob": 1.5}, 1, r"augment.jitter_prob must be a probability in \[0, 1\]"),
    ({"augment.grayscale_prob": -0.2}, 1, "augment.grayscale_prob must be a probability"),
    (
        {"augment.grayscale_before_jitter": None},
        1,
        "augment.grayscale_before_jitter must be True or False",
    ),
    ({"augment.blur_prob": (0.5,)}, 1, r"augment.blur_prob must be two probabilities"),
    ({"augment.blur_prob": (1.0, 1.1)}, 1, r"augment.blur_prob must be two probabilities"),
    ({"augment.solarize_prob": (0.0, -0.2)}, 1, "augment.solarize_prob must be two probabilities"),
    ({"augment.blur_sigma": (2.0, 0.1)}, 1, r"augment.blur_sigma must be \(Gaussian sigma min"),
    ({"model.cifar_stem": None}, 1, "model.cifar_stem must be True or False, got None"),
    ({"model.cifar_stem": False}, 1, "dataset.image_size 16 is too small for the ImageNet stem"),
    ({"optim.base_lr": float("nan")}, 1, "optim.base_lr must be > 0, got nan"),
    ({"optim.momentum": 1.0}, 1, r"optim.momentum must be in \[0, 1\), got 1.0"),
    ({"optim.lr_milestones": (160, 120)}, 1, "optim.lr_milestones must be increasing epochs"),
    ({"optim.lr_milestones": (0, 5)}, 1, "optim.lr_milestones must be increasing epochs >= 1"),
    ({"knn.every_epochs": 0}, 1, "knn.every_epochs must be an integer >= 1, got 0"),
    ({"knn.k": 0}, 1, "knn.k must be an integer >= 1, got 0"),
    ({"knn.k": 600}, 1, r"knn.k \(600\) must be <= dataset.max_train_examples \(512\)"),
    ({"knn.temperature": 0.0}, 1, "knn.temperature must be > 0, got 0.0"),
    ({"show.at_end": None}, 1, "show.at_end must be True or False, got None"),
    ({"show.queries": 0}, 1, "show.queries must be an integer >= 1, got 0"),
    ({"show.neighbours": 0}, 1, "show.neighbours must be an integer >= 1, got 0"),
    ({"show.map_points": 5}, 1, "show.map_points must be an integer >= 10, got 5"),
    ({"show.seed": -1}, 1, "show.seed must be an integer >= 0, got -1"),
    ({"dataset.host_threads": -1}, 1, "dataset.host_threads must be an integer >= 0, got -1"),
    ({"dataset.resize_on": "gpu"}, 1, "dataset.resize_on must be 'host' or 'device', got 'gpu'"),
    (
        {"dataset.resize_on": "device", "dataset.union_buffer": 20},
        1,
        r"dataset.union_buffer must be an integer >= 2 x dataset.image_size \(32: it carries two",
    ),
    ({"knn.baselines": "yes"}, 1, r"knn.baselines must be one of \['auto', 'on', 'off'\]"),
    ({"checkpoint.every_steps": -1}, 1, "checkpoint.every_steps must be an integer >= 0"),
    ({"checkpoint.keep": 0}, 1, "checkpoint.keep must be an integer >= 1, got 0"),
    ({"checkpoint.keep_every_steps": -2}, 1, "checkpoint.keep_every_steps must be an integer"),
    ({"log_every_steps": 0}, 1, "log_every_steps must be an integer >= 1, got 0"),
    ({"profile_steps": -1}, 1, "profile_steps must be an integer >= 0, got -1"),
    ({"profile_first_step": 0}, 1, "profile_first_step must be an integer >= 1, got 0"),
    ({"init_from": ""}, 1, "init_from must be a path to another run's checkpoints"),
    ({"imports": "no_such_fork_module"}, 1, "imports: cannot import 'no_such_fork_module' "),
    ({"imports": "../my_pkg"}, 1, "imports: '../my_pkg' is not a module name"),
    # Bad input that used to fail late or deep inside a library.
    ({"seed": 2**70}, 1, r"seed must be < 2\*\*31, got 1180591620717411303424"),
    ({"dataset.name": "../../etc/passwd"}, 1, "dataset.name must be a TFDS dataset name, got '../"),
    ({"init_from": "/etc/passwd"}, 1, "init_from must be another run's workdir, .* got the file"),
    # MoCo v3's fields, and which algorithm each belongs to.
    (
        {"optim.name": "adam"},
        1,
        r"optim.name must be one of \['sgd', 'lars', 'adamw'\], got 'adam'",
    ),
    ({"optim.name": "lars"}, 1, "optim.name 'lars' is MoCo v3's: algorithm 'moco' trains with"),
    ({"optim.betas": (0.9, 1.0)}, 1, r"optim.betas must be two numbers in \[0, 1\)"),
    ({"optim.warmup_epochs": -1}, 1, "optim.warmup_epochs must be an integer >= 0, got -1"),
    (
        {"optim.schedule": "warmup_cosine", "optim.warmup_epochs": 1},
        1,
        r"optim.warmup_epochs \(1\) must be < epochs \(1\)",
    ),
    ({"moco.momentum_cosine": None}, 1, "moco.momentum_cosine must be True or False, got None"),
    ({"moco.momentum_cosine": True}, 1, "moco.momentum_cosine is MoCo v3's: algorithm 'moco'"),
    ({"model.mlp_dim": 0}, 1, "model.mlp_dim must be a positive integer, got 0"),
    ({"model.zero_init_residual": None}, 1, "model.zero_init_residual must be True or False"),
    ({"model.stop_grad_conv1": None}, 1, "model.stop_grad_conv1 must be True or False"),
    ({"model.head": "v3_vit"}, 1, "model.head 'v3_vit' is MoCo v3's projector: algorithm 'moco'"),
    ({**V3, "model.head": "mlp"}, 1, "algorithm 'moco_v3' needs a v3 projector: model.head"),
    ({**V3, "model.bn_mode": "shuffle"}, 1, "algorithm 'moco_v3' has no Shuffle-BN"),
    # The image and the width against the backbone's shape (shape_rules), before the model is
    # built: a ResNet trained on 1x1 images, a ViT failed inside its initialisation.
    (
        {"dataset.image_size": 1},
        1,
        "dataset.image_size 1 is too small for resnet18 with the CIFAR stem: it downsamples 8x, "
        "so the smallest size it accepts is 8",
    ),
    (
        {"model.backbone": "vit_test", "dataset.image_size": 2},
        1,
        "dataset.image_size 2 is smaller than one 4x4 patch of model.backbone vit_test: the "
        "smallest size it accepts is 4",
    ),
    (
        {"model.backbone": "vit_test", "dataset.image_size": 18},
        1,
        r"dataset.image_size 18 is not divisible by the patch size 4 of model.backbone vit_test: "
        r"use a multiple of 4 \(e.g. 16 or 20\)",
    ),
    (
        {"model.backbone": "vit_tiny", "model.width_multiplier": 1 / 12},
        1,
        "model.backbone vit_tiny at model.width_multiplier 0.0833.* is 16 wide, which its 3 heads "
        "do not split",
    ),
    (
        {"model.backbone": "vit_test", "model.width_multiplier": 0.03125},
        1,
        "model.backbone vit_test at model.width_multiplier 0.03125 is 2 wide: the 2-D sin-cos "
        "position embedding needs a width divisible by 4",
    ),
]


@pytest.mark.parametrize("overrides,devices,message", BAD_VALUES)
def test_bad_config_is_refused_with_a_specific_message(overrides, devices, message, monkeypatch):
    def must_not_compile(*args, **kwargs):
        raise AssertionError("the step was built before the config was validated")

    monkeypatch.setattr(moco, "make_train_step", must_not_compile)
    config = tiny_config(**overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(config, devices)
    with pytest.raises(ConfigError, match=message):
        moco_jax.build(config, steps_per_epoch=10, devices=jax.devices()[:devices])


def _linear_tiny(**overrides):
    from moco_jax.config.defaults import linear_config

    config = linear_config()
    config.dataset, config.model = tiny_config().dataset, tiny_config().model
    config.model.bn_mode = "sync"
    for dotted, value in overrides.items():
        section, leaf = dotted.split(".")
        config[section][leaf] = value
    return config


FINE_TUNE = {"linear.train_backbone": True, "linear.backbone_lr": 0.1}
LINEAR_BAD_VALUES = [
    ({"linear.num_classes": 1}, "linear.num_classes must be an integer >= 2, got 1"),
    ({"linear.eval_every_epochs": 0}, "linear.eval_every_epochs must be an integer >= 1"),
    ({"linear.init_std": 0.0}, "linear.init_std must be > 0, got 0.0"),
    ({"linear.backbone_lr": -1.0}, "linear.backbone_lr must be >= 0, got -1.0"),
    ({"linear.cached_features": None}, "linear.cached_features must be True or False"),
    ({"linear.train_backbone": None}, "linear.train_backbone must be True or False"),
    (
        {**FINE_TUNE, "linear.cached_features": True},
        "linear.cached_features and linear.train_backbone exclude each other",
    ),
    ({"linear.train_backbone": True}, "linear.train_backbone needs linear.backbone_lr > 0"),
    (
        {**FINE_TUNE, "model.bn_mode": "shuffle"},
        "fine-tuning has no keys to shuffle: set model.bn_mode to 'sync' or 'local'",
    ),
    ({"linear.pretrained": ""}, "init_from must be a path"),
]


@pytest.mark.parametrize("overrides,message", LINEAR_BAD_VALUES)
def test_bad_linear_config_is_refused_with_a_specific_message(overrides, message):
    from moco_jax.run.linear_eval import with_pretrained

    with pytest.raises(ConfigError, match=message):
        validate_config(with_pretrained(_linear_tiny(**overrides)), 1)


def test_every_linear_field_has_a_bad_value_above():
    from moco_jax.config.defaults import linear_config

    covered = {field for overrides, _ in LINEAR_BAD_VALUES for field in overrides}
    assert {f"linear.{key}" for key in linear_config().linear} - covered == set()


def test_every_config_field_has_a_bad_value_above():
    """The table covers every field of base_config (a new field needs a rule and a row)."""
    from moco_jax.config.defaults import base_config

    def leaves(config, prefix=""):
        for key, value in config.items():
            name = f"{prefix}{key}"
            if hasattr(value, "items"):
                yield from leaves(value, f"{name}.")
            else:
                yield name

    covered = {field for overrides, _, _ in BAD_VALUES for field in overrides}
    covered |= {field for overrides, _ in RUN_BAD_VALUES for field in overrides}
    assert set(leaves(base_config())) - covered == set()


# Rules of a run that building a step does not need (validate_run_config, before the mesh).
RUN_BAD_VALUES = [
    ({"num_devices": 16}, "num_devices is 16 but only 8 device"),
    (
        {"dataset.mean": (0.5, 0.5, 0.5)},
        r"dataset.mean must hold one number per channel \(dataset.num_channels=1\)",
    ),
    ({"dataset.std": (0.3, 0.3)}, "dataset.std must hold one number per channel"),
    ({"dataset.num_channels": 3}, r"dataset.mean must hold one number .*got \(0.28604,\)"),
]


@pytest.mark.parametrize("overrides,message", RUN_BAD_VALUES)
def test_bad_run_config_is_refused_before_the_mesh(overrides, message, tmp_path):
    from moco_jax.run.run_setup import setup_run

    with pytest.raises(ConfigError, match=message):
        validate_run_config(tiny_config(**overrides), visible_devices=8)
    with pytest.raises(ConfigError, match=message):
        setup_run(tiny_config(**overrides), tmp_path)


@pytest.mark.parametrize(
    "backbone,cifar_stem,smallest",
    [("resnet18", True, 8), ("resnet18", False, 32), ("vit_test", True, 4)],
)
def test_the_smallest_image_size_a_backbone_accepts_fills_its_last_stage(
    backbone, cifar_stem, smallest
):
    """At the smallest accepted size the model builds, its ResNet's last stage is one cell of
    image (1x1) and the ViT has one patch; one pixel less is refused, naming that size."""
    import flax.linen as nn
    import jax.numpy as jnp

    from moco_jax.models import get_backbone_factory

    config = tiny_config(**{"model.backbone": backbone, "model.cifar_stem": cifar_stem})
    config.dataset.image_size = smallest
    validate_config(config, 1)
    model = get_backbone_factory(backbone)(config.model, nn.BatchNorm, jnp.float32)
    x = jnp.ones((2, smallest, smallest, 1))
    last = "layer4_" if backbone.startswith("resnet") else "patch_embed"
    # Shapes only (traced, not compiled: a ResNet-18 compiles for a minute on 2 cores).
    features, state = jax.eval_shape(
        lambda x: model.init_with_output(
            jax.random.key(0),
            x,
            train=False,
            capture_intermediates=lambda mdl, _: (mdl.name or "").startswith(last),
        ),
        x,
    )
    shapes = {tuple(leaf.shape) for leaf in jax.tree.leaves(state["intermediates"])}
    cells = (1, 1) if backbone.startswith("resnet") else (1,)  # a 1x1 map; one patch token
    assert shapes and all(shape[1:-1] == cells for shape in shapes), shapes
    assert features.shape[0] == 2
    config.dataset.image_size = smallest - 1
    with pytest.raises(ConfigError, match=f"the smallest size it accepts is {smallest}"):
        validate_config(config, 1)


def test_good_configs_pass():
    from configs import moco_v1_imagenet, moco_v2_cifar, moco_v2_imagenet, smoke

    validate_config(smoke.get_config(), 8)
    validate_config(moco_v2_cifar.get_config(), 1)
    validate_config(moco_v1_imagenet.get_config(), 8)
    validate_config(moco_v2_imagenet.get_config(), 8)
    validate_config(tiny_config(**{"moco.queue_size": 64}), 1)  # K == batch is allowed


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"dataset.image_size": 100000}, r"two views of 8 images of 100000x100000x1: 596 GiB"),
        ({"moco.queue_size": 10**12}, r"needs at least 4.77e\+05 GiB per device \(state 4.77e\+05"),
        (
            {"dataset.name": "imagenet2012", "dataset.resize_on": "device"}
            | {"dataset.union_buffer": 100000},
            r"8 union buffers of 100000x100000: 74.5 GiB\) .* \(or dataset.union_buffer\)",
        ),
    ],
)
def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_allocated(
    overrides, message
):
    with pytest.raises(ConfigError, match=message):
        moco_jax.build(tiny_config(**overrides), steps_per_epoch=10, devices=jax.devices()[:8])


def test_a_resumed_run_must_cut_epochs_as_the_saved_one():
    from types import SimpleNamespace

    from moco_jax.run.run_setup import _check_epoch_length

    saved = SimpleNamespace(restored_step=16, restored_extra={"steps_per_epoch": 8})
    _check_epoch_length(saved, 8)
    with pytest.raises(ConfigError, match="saved by a run with 8 steps per epoch, this one has 4"):
        _check_epoch_length(saved, 4)
