"""One run per workdir: a live holder is named, a SIGKILLed one leaves no stale lock, and a refused
run touches nothing (not even an in-flight checkpoint's temporary directory). The processes of
one pod run, which share a workdir, check that it is writable at once without tripping on each
other."""

import os
import pathlib
import signal
import subprocess
import sys
import time

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


@pytest.mark.filterwarnings("ignore:os.fork")  # the children touch only the file system
def test_processes_checking_one_workdir_at_once_do_not_remove_each_others_probe(tmp_path):
    """The processes of a pod run check a shared workdir at the same moment: each one's write
    probe is its own (a shared name let one unlink the other's between its write and unlink)."""
    from etils import epath

    from moco_jax.run.run_setup import _check_workdir

    workdir = epath.Path(tmp_path / "shared")
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # a child: no jax here, only the file system
            code = 0
            try:
                for _ in range(300):
                    _check_workdir(workdir)
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    codes, deadline = {}, time.monotonic() + 120  # a child stuck on a lock fails, never hangs
    while len(codes) < len(children) and time.monotonic() < deadline:
        for pid in set(children) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for pid in set(children) - set(codes):
        os.kill(pid, signal.SIGKILL)
        codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert [codes[pid] for pid in children] == [0] * 4
    assert list(pathlib.Path(workdir).iterdir()) == []  # and no probe is left behind
