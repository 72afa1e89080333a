"""What Shuffle-BN does on a number of devices (config/batch_rules.py), the queue's warning,
and the start-up's phase lines and baselines switch (run/startup.py)."""

import logging

import numpy as np
import pytest

from moco_jax.config.batch_rules import key_bn_group_size, queue_warnings, shuffle_group
from moco_jax.run import trainer
from moco_jax.run.startup import Startup, baselines_wanted
from tiny import build, image_batches, run_steps, tiny_config

MLP = {"model.backbone": "mlp", "model.width_multiplier": 0.125}
V3 = {"algorithm": "moco_v3", "model.head": "v3_resnet", "model.bn_mode": "sync"}


@pytest.mark.parametrize(
    "setting,devices,group",
    [(8, 256, 8), (8, 8, 8), (8, 4, 4), (8, 1, 1), (0, 256, 256), (2, 8, 2), (1, 8, 1)],
)
def test_shuffle_group_is_the_setting_at_most_the_devices(setting, devices, group):
    model = tiny_config(**{"model.shuffle_group_devices": setting}).model
    assert shuffle_group(model, devices) == group


@pytest.mark.parametrize(
    "overrides,per_device,devices,expected",
    [
        ({}, 64, 1, 8),  # one device: 8 BN groups, the official colab's --bn-splits 8
        ({"model.shuffle_group_devices": 1}, 64, 8, 8),  # keys never leave their device
        ({}, 8, 8, 0),  # shuffled across 8 devices: the whole per-device batch
        ({"model.bn_group_size": 4}, 64, 1, 4),  # the config's own groups win
        ({"model.bn_mode": "local"}, 64, 1, 0),  # no Shuffle-BN: nothing added
    ],
)
def test_key_bn_groups(overrides, per_device, devices, expected):
    model = tiny_config(**overrides).model
    assert key_bn_group_size(model, per_device, devices) == expected


def test_one_device_shuffle_bn_trains_as_8_explicit_bn_groups():
    """bn_group_size 0 on one device is the colab's split: the same step as 8 groups set by
    hand (64 images: groups of 8), not BN over the whole batch the keys came from."""
    losses = {}
    for group in (0, 8):
        config = tiny_config(**MLP, **{"model.bn_group_size": group})
        built, state = build(config, 1)
        _, history = run_steps(built, state, image_batches(config, 2))
        losses[group] = [h["loss"] for h in history]
    assert losses[0] == losses[8]


def test_a_short_queue_is_warned_about_once_by_a_training_run(caplog, monkeypatch):
    config = tiny_config()  # K = 96 for 64 keys a step
    (warning,) = queue_warnings(config)
    assert warning.startswith("moco.queue_size (K=96) is 1.5x the 64 keys a step enqueues")
    assert queue_warnings(tiny_config(**{"moco.queue_size": 256})) == []  # 4 steps
    assert queue_warnings(tiny_config(**{"moco.symmetric": True, "moco.queue_size": 512})) == []
    assert queue_warnings(tiny_config(**V3)) == []  # no queue

    class SetUp:  # a run that was set up (a refused one ends with its error line alone)
        closed = False

        def close(self):
            self.closed = True

    run = SetUp()

    def stop(run, startup):
        raise StopIteration  # after the warning, before the first step

    monkeypatch.setattr(trainer, "setup_run", lambda config, workdir: run)
    monkeypatch.setattr(trainer, "train_loop", stop)
    with caplog.at_level(logging.WARNING), pytest.raises(StopIteration):
        trainer.train_and_evaluate(config, "unused")
    assert [r.getMessage() for r in caplog.records] == [warning] and run.closed


@pytest.mark.parametrize(
    "setting,dataset,images,wanted",
    [
        ("auto", "fashion_mnist", 60_000, True),
        ("auto", "imagenette/320px-v2", 9_469, True),
        ("auto", "imagenet2012", 1_281_167, False),
        ("on", "imagenet2012", 1_281_167, True),
        ("off", "fashion_mnist", 60_000, False),
    ],
)
def test_baselines_switch(setting, dataset, images, wanted):
    config = tiny_config(**{"knn.baselines": setting, "dataset.name": dataset})
    assert baselines_wanted(config, images)[0] is wanted


def test_startup_says_each_phase_before_it_runs_and_sums_them_up():
    lines = []
    startup = Startup(echo=lines.append)
    with startup.phase("data", "reading"):
        assert lines == ["start-up: data: reading"]
    startup.skip("baselines", "knn.baselines 'off'")
    with startup.phase("compile", "the step"):
        pass
    startup.done()
    assert lines[1:3] == [
        "start-up: baselines: skipped (knn.baselines 'off')",
        "start-up: compile: the step",
    ]
    assert lines[3].startswith("start-up: done in ") and "(data " in lines[3]
    assert np.isclose(sum(startup.seconds.values()), float(lines[3].split()[3]), atol=0.1)
    quiet = Startup(enabled=False, echo=lines.append)
    quiet.say("data", "x")
    quiet.done()
    assert len(lines) == 4
