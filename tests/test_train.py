"""train.py end to end on real Fashion-MNIST (a few steps), and its errors that need data
(bad command lines: tests/test_bad_input.py)."""

import json
import os
import pathlib

import forkserver
import pytest
from data_fixtures import fashion_mnist_data_dir
from xla_flags import cpu_devices

from moco_jax.config.checks import ConfigError
from moco_jax.data.tfds_source import DatasetError
from moco_jax.evaluate import evaluate_knn
from moco_jax.run import trainer
from moco_jax.run.trainer import train_and_evaluate
from tiny import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train_py(workdir, *overrides, devices=8):
    env = dict(os.environ, MOCO_JAX_NO_PROGRESS="1")
    env["XLA_FLAGS"] = cpu_devices(devices)
    command = [
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs" / "smoke.py"),
        "--workdir",
        str(workdir),
        *overrides,
    ]
    return forkserver.server().run(command, env=env)  # train.py, its imports done once


@pytest.fixture(scope="module")
def data_dir():
    return fashion_mnist_data_dir()


def _no_baselines_pass(run):
    raise AssertionError("the baselines were computed again")


def test_smoke_pretraining_through_train_py(tmp_path, data_dir, monkeypatch):
    result = _train_py(tmp_path, f"--config.dataset.data_dir={data_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("metrics.jsonl", "epochs.jsonl", "baselines.json", "pretraining.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert any((tmp_path / "tensorboard").iterdir())
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("knn_pixels", "random_init_knn_head", "final_loss", "final_knn_head"):
        assert 0 <= summary[key] <= 100, key
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == 8  # 512 examples / batch 64
    assert steps[-1]["queue_ptr"] == (8 * 64) % 96
    assert "summary:" in result.stdout
    below = summary["final_knn_head"] < summary["random_init_knn_head"]  # 8 steps: expected
    assert ("is below the random-init encoder's" in result.stdout) == below, result.stdout

    # Rerunning the same command resumes from the final checkpoint: no step is repeated.
    again = _train_py(tmp_path, f"--config.dataset.data_dir={data_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(steps)

    # The last record cut and the baselines file lost after the final checkpoint: a rerun takes
    # both back from that checkpoint, as they were, without computing the baselines again.
    saved = {name: (tmp_path / name).read_bytes() for name in ("epochs.jsonl", "baselines.json")}
    assert b'"knn_head"' in saved["epochs.jsonl"]
    (tmp_path / "epochs.jsonl").write_bytes(saved["epochs.jsonl"][:-20])
    (tmp_path / "baselines.json").unlink()
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_baselines", _no_baselines_pass)
        assert train_and_evaluate(tiny_config(**{"dataset.data_dir": data_dir}), str(tmp_path))
    for name, expected in saved.items():
        assert (tmp_path / name).read_bytes() == expected, name
    assert json.loads((tmp_path / "summary.json").read_text()) == summary

    # The standalone evaluation of the saved run reproduces the final kNN numbers.
    result = evaluate_knn(str(tmp_path))
    assert result["step"] == 8
    assert result["knn_head"] == pytest.approx(summary["final_knn_head"])
    assert result["knn_pixels"] == pytest.approx(summary["knn_pixels"])
    assert result["random_init_knn_head"] == pytest.approx(summary["random_init_knn_head"])

    # A run started from this one's weights: its random-init baseline is still a random init,
    # and the weights it loaded are a baseline of their own (this run's final kNN).
    # It also traces steps 4 and 5 with jax.profiler (config.profile_steps).
    config = tiny_config(**{"dataset.data_dir": data_dir, "init_from": str(tmp_path)})
    config.profile_steps, config.profile_first_step = 2, 3
    finetune = train_and_evaluate(config, str(tmp_path / "finetune"))
    assert list((tmp_path / "finetune" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert finetune["random_init_knn_head"] == pytest.approx(summary["random_init_knn_head"])
    assert finetune["init_from_knn_head"] == pytest.approx(summary["final_knn_head"])
    assert finetune["init_from_knn_backbone"] == pytest.approx(summary["final_knn_backbone"])


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        ({"dataset.name": "cifar10", "dataset.download": False}, DatasetError, "not prepared"),
        ({"dataset.max_train_examples": 32}, ConfigError, "batch_size 64 is larger than the 32"),
        ({"model.cifar_stem": False}, ConfigError, "too small for the ImageNet stem"),
        (
            {"dataset.num_channels": 3, "dataset.mean": (0.5,) * 3, "dataset.std": (0.5,) * 3},
            ConfigError,
            "images have 1 channel",
        ),
        ({"dataset.image_size": 8, "augment.crop": False}, ConfigError, "augment.crop is off"),
    ],
)
def test_data_dependent_config_errors(tmp_path, data_dir, overrides, error, message):
    config = tiny_config(**{"dataset.data_dir": data_dir, **overrides})
    if overrides.get("dataset.name") == "cifar10":
        config.dataset.data_dir = str(tmp_path)
    with pytest.raises(error, match=message):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_unwritable_workdir_fails_before_training(tmp_path, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="is not writable"):
        train_and_evaluate(tiny_config(**{"dataset.data_dir": data_dir}), str(blocker / "run"))
