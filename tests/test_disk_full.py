"""A disk that fills in the middle of train.py (a 3 MiB tmpfs), before a save or while orbax writes
one in the background: one ``error:`` line saying what the run needs and nothing else, the
checkpoints before it intact, and the same command finishes the run once there is room."""

import os
import pathlib
import shutil
import subprocess
import sys

import forkserver
import pytest
from data_fixtures import fashion_mnist_data_dir
from xla_flags import cpu_devices

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


def _train(workdir, *flags, **faults):
    env = dict(os.environ, MOCO_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu", **faults)
    env["XLA_FLAGS"] = cpu_devices(8)
    data = f"--config.dataset.data_dir={fashion_mnist_data_dir()}"
    entry = [str(ROOT / "tests/with_faults.py")] if faults else []  # installs faults.py
    command = [*entry, *RUN, *flags, data, "--workdir", str(workdir)]
    return forkserver.server().run(command, env=env)  # train.py, its imports done once


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


def _one_error_line(result):
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == result.stderr.strip().splitlines()[-1:], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_a_disk_that_fills_during_a_background_save_is_one_line_and_the_rerun_finishes(
    small_disk,
):
    """The disk fills right after step 4's save started (a test-only fault), while orbax writes
    it in its threads: that write, or step 5's, fails there. No records are due before the end
    of the epoch (step 8), so the first write to fail is a checkpoint's."""
    workdir = small_disk / "run"
    quiet = "--config.log_every_steps=8"
    result = _train(workdir, quiet, MOCO_JAX_FAULT_FILL_DISK_AT_STEP="4")
    error = _one_error_line(result)
    assert "no space left on device" in error and "one needs about" in error, error
    assert "The checkpoints before it are intact" in error
    checkpoints = workdir / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert any(name.endswith(".orbax-checkpoint-tmp") for name in names), names  # cut short
    assert max(int(name) for name in names if name.isdigit()) <= 5, names

    (workdir / "fault_disk_filler").unlink()
    result = _train(workdir, quiet)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped damaged" not in result.stderr  # it resumed from an intact checkpoint
    assert not [p.name for p in checkpoints.iterdir() if "tmp" in p.name]  # cleaned up
    assert (checkpoints / "8").is_dir() and (workdir / "summary.json").exists()
    assert "final_knn_head" in result.stdout


def test_a_background_write_failing_after_the_error_line_stays_below_it(tmp_path):
    """The error line is printed while a thread of orbax's failed write may still run: waiting
    for it at exit re-raised its error, a traceback under the line (item 3's intermittent end)."""
    script = (
        "import asyncio, errno\n"
        "from orbax.checkpoint._src.futures.future import CommitFuture\n"
        "from absl import flags, logging\n"
        "from moco_jax.run.cli_errors import fail, quiet_library_logs\n"
        "flags.FLAGS(['script'])\n"
        "logging.use_absl_handler()\n"
        "quiet_library_logs()  # as train.py starts\n"
        "async def write():\n"
        "    await asyncio.sleep(0.5)\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "CommitFuture(write())\n"
        "fail('the last line')\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert _one_error_line(result) == "error: the last line"
