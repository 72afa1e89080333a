"""One run per workdir: a lock that a training or evaluation run holds while it uses a workdir.

On a local (or any POSIX) file system the lock is ``fcntl.flock`` on ``<workdir>/.lock``: the
kernel releases it when the holding process ends, however it ends (a SIGKILLed run leaves no
stale lock behind). The file names the holder (host, pid, start time) so a second run can say
who holds it. In a multi-process run only process 0 takes it (the other processes are the same
run).

Buckets (``gs://...``) cannot be locked atomically, so no lock is taken there (a warning says
so). What still protects a run there: orbax writes every checkpoint into a temporary directory
and renames it when complete, so a checkpoint is never half-written; but two runs on one bucket
workdir would interleave their checkpoints and records. Give every run its own workdir.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

import jax
from absl import logging
from etils import epath

from moco_jax.storage import is_remote

LOCK_NAME = ".lock"


class WorkdirLocked(OSError):
    """Another live run holds the workdir."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` — or ``acquire()`` / ``release()``."""

    def __init__(self, workdir: str | epath.Path):
        self.workdir = epath.Path(workdir)
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Take the lock or raise ``WorkdirLocked`` naming the holder (never waits)."""
        if jax.process_index() != 0 or self._fd is not None:
            return self
        if is_remote(self.workdir):
            logging.warning(
                "%s is not a local directory: it cannot be locked, so make sure no other run "
                "uses it (see moco_jax/run/workdir_lock.py)",
                self.workdir,
            )
            return self
        path = os.fspath(self.workdir / LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise WorkdirLocked(
                f"workdir {self.workdir} is in use by another run ({holder}); wait for it to "
                f"finish or stop it, or use another --workdir"
            ) from None
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the next run in (also done by the kernel when this process ends)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
