"""One run per workdir: a live holder is named, a SIGKILLed one leaves no stale lock, and a refused
run touches nothing (not even an in-flight checkpoint's temporary directory)."""

import os
import pathlib
import signal
import subprocess
import sys

import forkserver
import pytest

from moco_jax.run.workdir_lock import WorkdirLock, WorkdirLocked

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOLDER = (
    "import sys, time; sys.path.insert(0, sys.argv[2]);"
    "from moco_jax.run.workdir_lock import WorkdirLock;"
    "WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)"
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path``'s lock (killed with SIGKILL at the end)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_a_live_holder_is_named_and_a_killed_one_leaves_no_stale_lock(tmp_path, holder):
    with pytest.raises(WorkdirLocked, match=rf"in use by another run \(host .*, pid {holder.pid}"):
        WorkdirLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with WorkdirLock(tmp_path):  # the kernel dropped the dead holder's lock
        with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()  # one run per workdir within a process too
    WorkdirLock(tmp_path).acquire().release()


def test_train_py_on_a_held_workdir_refuses_in_one_line_and_touches_nothing(tmp_path, holder):
    in_flight = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp"
    in_flight.mkdir(parents=True)  # the holder's checkpoint being written
    env = dict(os.environ, MOCO_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
    command = [str(ROOT / "train.py"), "--config", str(ROOT / "configs/smoke.py")]
    result = forkserver.server().run([*command, "--workdir", str(tmp_path)], env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: workdir {tmp_path} is in use by another run (host "), last
    assert f"pid {holder.pid}" in last and "Traceback" not in result.stderr
    assert in_flight.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoints"]
