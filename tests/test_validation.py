"""Bad configs fail with a specific message before any model is built or compiled."""

import pytest

from moco_jax import ConfigError, build_engine, engine, validate_config
from moco_jax.mesh import make_data_mesh
from tiny import tiny_config

BAD_VALUES = [
    ({"moco.queue_size": 32}, 1, r"queue_size \(K=32\) must be >= the global batch_size \(64\)"),
    ({"batch_size": 60}, 8, "batch_size 60 is not divisible by the 8 devices"),
    (
        {"model.backbone": "resnet9000"},
        1,
        "unknown backbone 'resnet9000'; available: mlp, resnet18",
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
]


@pytest.mark.parametrize("overrides,devices,message", BAD_VALUES)
def test_bad_config_is_refused_with_a_specific_message(overrides, devices, message, monkeypatch):
    def must_not_compile(*args, **kwargs):
        raise AssertionError("the step was built before the config was validated")

    monkeypatch.setattr(engine, "make_train_step", must_not_compile)
    config = tiny_config(**overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(config, devices)
    with pytest.raises(ConfigError, match=message):
        build_engine(config, make_data_mesh(devices), steps_per_epoch=10)


def test_good_configs_pass():
    from configs import moco_v1_imagenet, moco_v2_cifar, moco_v2_imagenet, smoke

    validate_config(smoke.get_config(), 8)
    validate_config(moco_v2_cifar.get_config(), 1)
    validate_config(moco_v1_imagenet.get_config(), 8)
    validate_config(moco_v2_imagenet.get_config(), 8)
    validate_config(tiny_config(**{"moco.queue_size": 64}), 1)  # K == batch is allowed
