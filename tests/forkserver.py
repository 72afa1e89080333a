"""Command-line runs for the tests, started as forks of one process that imported the program once.

A fresh ``python train.py ...`` spends ~10 s importing TensorFlow, JAX, Flax, orbax and the library
before it reads its first flag (more on a loaded 2-core machine), and the tests start dozens. Here
one server process per test worker imports them once; each run is ``os.fork()`` of it: a process
of its own (pid, exit code, signals, stdout/stderr files, working directory, environment) that
begins where ``python ARGS`` would be once its imports are done, and exits the way the interpreter
does (``atexit``, non-daemon threads joined).

What a fork cannot show is what a program prints or does while it imports: the tests of that
(``--help``, banners and warnings of a fresh start) keep real subprocesses. Settings that JAX or
TensorFlow read when they are imported must be the server's: a run asking for other values is
refused (``ForkServerError``), not silently run with the server's.

Protocol: the client writes one JSON request per line (argv, env, cwd, stdout, stderr, nice);
the server answers ``{"pid": ...}`` and, when that process ends, ``{"ended": pid, "status": ...}``.
The server waits on its children through pidfds, on one thread (a fork copies only the forking
thread: no other thread of the server may hold a lock the child needs).
"""

from __future__ import annotations

import json
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Read by JAX or TensorFlow at import (config defaults from the environment): a run must not ask
# for other values than the server imported with. XLA_FLAGS is read when the backend starts, the
# cluster variables when jax.distributed starts: those may differ.
IMPORT_TIME = ("JAX_PLATFORMS", "JAX_ENABLE_X64", "JAX_COMPILATION_CACHE_DIR",
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "TF_CPP_MIN_LOG_LEVEL",
               "TF_ENABLE_ONEDNN_OPTS")  # fmt: skip
# What the programs set when these are unset (cli_errors.quiet_native_logs), before TensorFlow.
PROGRAM_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
PRELOAD = ("tensorflow", "tensorflow_datasets", "moco_jax.train", "moco_jax.evaluate",
           "moco_jax.export", "moco_jax.run.trainer", "moco_jax.run.linear_eval")  # fmt: skip


class ForkServerError(RuntimeError):
    pass


def base_env() -> dict[str, str]:
    """The environment the server imports with: the tests' own (tests/conftest.py sets the CPU
    platform, the shared compile cache and the programs' TensorFlow log settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    for name, value in PROGRAM_DEFAULTS.items():
        env.setdefault(name, value)
    env["PYTHONPATH"] = str(ROOT)
    return env


class Child:
    """A forked run, used like ``subprocess.Popen`` (``returncode`` is ``-N`` for signal N)."""

    def __init__(self, server: ForkServer, pid: int, args: list[str], logs):
        self.server, self.pid, self.args, self.logs = server, pid, args, logs
        self.returncode: int | None = None

    def poll(self) -> int | None:
        with self.server.ended_lock:
            if self.pid in self.server.ended:
                self.returncode = self.server.ended[self.pid]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.server.ended_lock:
            while self.pid not in self.server.ended:
                if not self.server.alive():
                    raise ForkServerError(f"the fork server died: {self.server.log_tail()}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                self.server.ended_lock.wait(min(left or 1.0, 1.0))
            self.returncode = self.server.ended[self.pid]
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def output(self) -> subprocess.CompletedProcess:
        """Wait, and the run as ``subprocess.run(..., capture_output=True, text=True)`` gives it."""
        code = self.wait(timeout=600)
        out, err = (pathlib.Path(p).read_text(errors="replace") for p in self.logs)
        return subprocess.CompletedProcess(self.args, code, out, err)


class ForkServer:
    """The client side: one server process; ``start`` forks a run of it."""

    def __init__(self):
        self.env = base_env()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="forkserver", suffix=".log")
        self.process = subprocess.Popen(
            [sys.executable, __file__], env=self.env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
        )  # fmt: skip
        self.ended: dict[int, int] = {}
        self.ended_lock = threading.Condition()
        self.pids: list[int] = []
        self.request_lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self.ended_lock:
                if "pid" in message:
                    self.pids.append(message["pid"])
                else:
                    self.ended[message["ended"]] = message["status"]
                self.ended_lock.notify_all()
        with self.ended_lock:
            self.ended_lock.notify_all()

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text()[-3000:]

    def start(self, args, env=None, cwd=None, stdout=None, stderr=None, nice=0) -> Child:
        """``args`` as for ``python``: ``[script, ...]``, ``["-m", module, ...]`` or ``["-c", code,
        ...]`` (a leading ``sys.executable`` is dropped). Output goes to the files ``stdout`` and
        ``stderr`` (temporary files when not given)."""
        args = [str(a) for a in args]
        if args and args[0] == sys.executable:
            args = args[1:]
        env = dict(self.env if env is None else env)
        for name in IMPORT_TIME:
            if env.get(name, PROGRAM_DEFAULTS.get(name)) != self.env.get(name):
                raise ForkServerError(
                    f"{name}={env.get(name)!r}: the fork server imported with "
                    f"{self.env.get(name)!r}; use a real subprocess for this run"
                )
        logs = [stdout, stderr]
        for i, path in enumerate(logs):
            if path is None:
                handle, logs[i] = tempfile.mkstemp(prefix="forkrun", suffix=(".out", ".err")[i])
                os.close(handle)
        request = {"argv": args, "env": env, "cwd": str(cwd or os.getcwd()), "nice": nice,
                   "stdout": str(logs[0]), "stderr": str(logs[1])}  # fmt: skip
        with self.request_lock, self.ended_lock:
            count = len(self.pids)
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            while len(self.pids) == count:
                if not self.alive():
                    raise ForkServerError(f"the fork server died: {self.log_tail()}")
                self.ended_lock.wait(1.0)
            pid = self.pids[count]
        return Child(self, pid, args, [pathlib.Path(p) for p in logs])

    def run(self, args, env=None, cwd=None, timeout=600, nice=0) -> subprocess.CompletedProcess:
        """Like ``subprocess.run(args, capture_output=True, text=True)``; killed at ``timeout``."""
        child = self.start(args, env=env, cwd=cwd, nice=nice)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
        result = child.output()
        for path in child.logs:
            os.unlink(path)
        return result

    def close(self) -> None:
        with self.ended_lock:
            running = [pid for pid in self.pids if pid not in self.ended]
        for pid in running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


_SERVER: ForkServer | None = None


def server() -> ForkServer:
    """This test worker's server, started on first use (its imports take ~10 s once)."""
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        _SERVER = ForkServer()
    return _SERVER


# --- The server process. ---


def _serve() -> None:
    from moco_jax.run import cli_errors

    cli_errors.quiet_native_logs()
    for module in PRELOAD:
        __import__(module)
    import gc

    gc.collect()
    gc.freeze()  # the imported objects stay out of the children's collections (and pages)
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)  # nothing but the protocol on the client's pipe
    requests = os.fdopen(os.dup(0), "r", buffering=1)
    os.dup2(null, 0)
    selector = selectors.DefaultSelector()
    selector.register(requests, selectors.EVENT_READ, None)
    while True:
        for key, _ in selector.select():
            if key.data is None:  # a request, or the client closed the pipe
                line = requests.readline()
                if not line:
                    return
                request = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    for fd in (requests.fileno(), protocol.fileno(), selector.fileno()):
                        os.close(fd)
                    _become(request)  # does not return
                pidfd = os.pidfd_open(pid)
                selector.register(pidfd, selectors.EVENT_READ, pid)
                protocol.write(json.dumps({"pid": pid}) + "\n")
            else:  # a run ended
                pid = key.data
                selector.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                protocol.write(json.dumps({"ended": pid, "status": _returncode(status)}) + "\n")


def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _become(request: dict) -> None:
    """In the forked child: the run's files, directory, environment and argv, then the program
    as ``__main__``; its SystemExit (or exception) ends the process as it would end python."""
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["nice"]:
        os.nice(request["nice"])
    code = 0
    try:
        _run_main(request["argv"])
    except SystemExit as stop:
        code = _exit_status(stop.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # What the interpreter does at exit, in its order, but the teardown of every module (seconds
    # with TensorFlow loaded, in a fresh python as here: not what the tests look at). Garbage is
    # collected, so what is printed of unraisable exceptions at exit still is.
    threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    import gc

    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_main(argv: list[str]) -> None:
    import runpy

    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        sys.modules.pop(argv[1], None)  # imported by the server: run afresh as __main__
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = argv
        sys.path[0] = str(pathlib.Path(argv[0]).resolve().parent)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    sys.path[0] = str(ROOT)
    _serve()
