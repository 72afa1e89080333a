"""A disk that fills in the middle of train.py (a 3 MiB tmpfs): one ``error:`` line saying what the
run needs and nothing else, the checkpoints before it intact, and the same command finishes the
run once there is room."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from data_fixtures import fashion_mnist_data_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = [
    str(ROOT / "train.py"),
    "--config",
    str(ROOT / "configs/smoke.py"),
    "--config.model.backbone=mlp",
    "--config.dataset.image_size=28",
    "--config.checkpoint.every_steps=1",
]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)])


def _train(workdir):
    env = dict(os.environ, MOCO_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".jax_cache")  # shared with the tests
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    data = f"--config.dataset.data_dir={fashion_mnist_data_dir()}"
    command = [sys.executable, *RUN, data, "--workdir", str(workdir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_a_disk_that_fills_during_train_py_is_one_line_and_the_rerun_finishes(small_disk):
    filler = small_disk / "filler"
    # Room for the checkpoints the run keeps (the up-front check passes), not for its records too.
    filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - 500_000))
    workdir = small_disk / "run"
    result = _train(workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == result.stderr.strip().splitlines()[-1:], result.stderr[-3000:]
    assert "no space left on device" in errors[0] and "one needs about" in errors[0]
    assert "The checkpoints before it are intact" in errors[0]
    assert "Traceback" not in result.stderr
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 8

    filler.unlink()
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "summary.json").exists()
    assert "final_knn_head" in result.stdout
