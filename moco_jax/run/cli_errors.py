"""Command-line entry points turn expected failures into one clear line and exit code 2.

A bad command line (unknown flag or config field, a value of the wrong type, a config file that
is missing, does not parse or whose ``get_config()`` returns no ``ConfigDict``, an empty
``--workdir``), a cluster that is not there, and the config, dataset, file-system and checkpoint
errors of a run all end the same way: one ``error:`` line on stderr naming what is wrong, exit
code 2, no traceback.

A run stopped by SIGTERM (preemption) after saving its state prints one ``stopped:`` line and exits
with 143 (128 + SIGTERM), as a process killed by the signal would: schedulers that requeue
preempted jobs see the usual code, and rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging as std_logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from moco_jax.config.checks import ConfigError
from moco_jax.data.tfds_source import DatasetError
from moco_jax.run import cli_help

EXPECTED_ERRORS = (ConfigError, DatasetError, OSError)
EXIT_USAGE = 2
PREEMPTED_EXIT_CODE = 128 + 15


def fail(message: str) -> NoReturn:
    """Print ``error: message`` as the last line of the process and exit with 2."""
    _exit(f"error: {message}", EXIT_USAGE)


def _exit(line: str, code: int) -> NoReturn:
    """``line`` on stderr, then exit with ``code`` once orbax's background threads are done.

    ``CheckpointManager.close()`` does not wait for the clean-up of temporary directories it
    starts when it opens: a manager closed at once (an error right after it was made) leaves that
    thread running, and at exit, when the interpreter no longer takes new thread-pool work, it
    fails and logs a traceback after our last line. Let it finish first. A thread of a background
    write that failed (a disk filling during an asynchronous save) re-raises its error when
    joined: that error is what the line reports, so it is dropped here."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    # Coroutines of a failed background write, collected as the interpreter shuts down, would
    # each print "Exception ignored ..." below the line: nothing is lost by not printing them.
    sys.unraisablehook = lambda unraisable: None
    # So would asyncio's "Task exception was never retrieved" for orbax's failed write tasks,
    # logged when they are collected.
    std_logging.getLogger("asyncio").disabled = True
    deadline = time.monotonic() + 60.0
    for thread in threading.enumerate():
        if type(thread).__module__.startswith("orbax.") and thread.is_alive() and not thread.daemon:
            with contextlib.suppress(Exception):  # its failure, or still running after 60 s
                thread.join(max(0.0, deadline - time.monotonic()))
    sys.exit(code)


# Device files of the accelerators JAX can use: NVIDIA (WSL: /dev/dxg), AMD, TPU (v2-v4: accel,
# v5e and later: vfio).
ACCELERATOR_DEVICE_FILES = (
    "/dev/nvidia*",
    "/dev/dxg",
    "/dev/kfd",
    "/dev/accel*",
    "/dev/vfio/[0-9]*",
)


def quiet_native_logs() -> None:
    """Before TensorFlow or JAX start: no banners or warnings of their C++ libraries.

    TensorFlow only reads files here: its INFO/WARNING lines (CPU features) and its oneDNN custom
    operations (with a banner of their own) are not wanted. JAX, with ``JAX_PLATFORMS`` unset,
    tries every backend it has; with libtpu installed (the test requirements install it) and no
    TPU, libtpu's start writes five lines of TPU_WORKER_HOSTNAMES warnings: there, a machine with
    no accelerator's device file runs on the CPU without trying. Values already set win."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if (
        "JAX_PLATFORMS" not in os.environ
        and importlib.util.find_spec("libtpu") is not None
        and not any(map(glob.glob, ACCELERATOR_DEVICE_FILES))
    ):
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:  # imported already: its config read the variable
            sys.modules["jax"].config.update("jax_platforms", "cpu")


def quiet_library_logs() -> None:
    """Library INFO logs (orbax, TFDS) drown the progress bar: show warnings unless asked. Orbax's
    own error logs (with tracebacks from its threads) are dropped too: the error they describe
    reaches the caller as an exception, which becomes the one ``error:`` line. So are asyncio's
    "Future exception was never retrieved" records: orbax reads a damaged checkpoint through
    futures that fail together, it raises the first failure and the others, collected whenever
    the garbage collector runs, would print their tracebacks before the ``error:`` line."""
    from absl import logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(_not_orbax_noise)
        sys.unraisablehook = _unless_from_orbax(sys.unraisablehook)


def _not_orbax_noise(record: std_logging.LogRecord) -> bool:
    """False for orbax's own log records and asyncio's reports of its abandoned failed futures."""
    if record.name == "asyncio" and " exception was never retrieved" in str(record.msg):
        return False
    return "/orbax/" not in record.pathname.replace(os.sep, "/")


def _unless_from_orbax(hook):
    """An unraisable-exception hook that drops what orbax's abandoned coroutines, and the
    TensorStore callbacks into their closed event loop, raise when a background write failed
    (the failure itself is reported as the ``error:`` line)."""

    def filtered(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and "/orbax/" in code.co_filename.replace(os.sep, "/"):
            return
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and (
            str(unraisable.exc_value) == "Event loop is closed"  # TensorStore's late callbacks
        )
        if not (closed_loop and unraisable.object is None):
            hook(unraisable)

    return filtered


def run_with_clear_errors(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn``; a config, dataset, file-system, checkpoint or divergence error prints one line
    and exits with 2; a preemption prints one line and exits with 143."""
    from moco_jax.run.checkpointing import CheckpointError, Preempted, TrainingDiverged

    try:
        return fn(*args)
    except (*EXPECTED_ERRORS, CheckpointError, TrainingDiverged) as err:
        fail(error_line(err))  # one line, whatever a library put in the message
    except Preempted as stop:
        _exit(f"stopped: {stop}", PREEMPTED_EXIT_CODE)


# --- The command line. ---


def error_line(err: BaseException) -> str:
    """An error's message on one line (its last line where the message carries a traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return " ".join(lines) or type(err).__name__


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _missing_field(err: BaseException, argv: Sequence[str]) -> str:
    """The override naming no field: the ``KEY`` of the ``--config.KEY=VALUE`` of ``argv`` that
    ConfigDict's errors name (else the unknown name of the innermost ``KeyError``)."""
    chain = [err]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    name = str(chain[-1].args[0]).strip("'\"") if chain[-1].args else "?"
    keys = [
        arg.split("=", 1)[0].split(".", 1)[1]
        for arg in argv
        if arg.startswith("--") and "." in arg.split("=", 1)[0]
    ]
    for key in keys:
        if name in key.split(".") or any(key in str(e) for e in chain):
            return key
    return name


def flag_error_line(err: BaseException, argv: Sequence[str] = ()) -> str:
    """One line for what parsing a command line with absl flags and ml_collections' ``--config``
    raised (``argv``: the command line, to name an override that names no field)."""
    if isinstance(err, (AttributeError, KeyError)):  # ConfigDict: an override names no field
        return (
            f"no config field {_missing_field(err, argv)!r}: each --config.KEY=VALUE must name "
            "a field of the config"
        )
    if isinstance(err, OSError):  # ml_collections: the config file did not load
        return f"cannot load the config file: {_last_line(err)}"
    return error_line(err)


class ConfigFileError(flags.Error):
    """A ``--config`` file that does not exist, does not run or gives no ``ConfigDict``."""


class _NoNoneWarning(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:  # the error says it instead
        return "get_config() returned None" not in record.getMessage()


def _line_in(err: BaseException, path: str) -> str:
    """`` (line N)`` of the innermost frame of ``path`` in ``err``'s traceback, if any."""
    target = os.path.abspath(path)
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if os.path.abspath(frame.filename) == target:
            return f" (line {frame.lineno})"
    return ""


class _ConfigFileParser(ConfigFileFlagParser):
    """ml_collections' parser, whose every failure is a ``ConfigFileError`` naming the file."""

    def parse(self, path: str) -> Any:
        file = path.split(":", 1)[0]
        if not file:
            raise ConfigFileError(f"--{self.name} is empty: give a config file (configs/*.py)")
        if not os.path.isfile(file):
            what = "not a file" if os.path.exists(file) else "no such file"
            raise ConfigFileError(f"--{self.name} {file}: {what}")
        from absl import logging

        logging.get_absl_logger().addFilter(no_none := _NoNoneWarning())
        try:
            config = super().parse(path)
        except SyntaxError as err:
            raise ConfigFileError(
                f"--{self.name} {file}: syntax error (line {err.lineno}): {err.msg}"
            ) from None
        except Exception as err:  # whatever the file's code raised
            # ml_collections re-raises a TypeError/ValueError with the traceback as its message.
            cause = err.__context__ if "Error whilst parsing" in str(err) else err
            where = _line_in(cause or err, file)
            reason = f"{type(cause or err).__name__}: {error_line(cause or err)}"
            raise ConfigFileError(
                f"--{self.name} {file}: loading it failed{where}: {reason}"
            ) from None
        finally:
            logging.get_absl_logger().removeFilter(no_none)
        if not isinstance(config, ml_collections.ConfigDict):
            try:  # ml_collections' stand-in for a file that did not load raises here
                getattr(config, "seed", None)
            except OSError as err:
                raise ConfigFileError(
                    f"--{self.name} {file}: cannot load it: {_last_line(err.__cause__ or err)}"
                ) from None
            raise ConfigFileError(
                f"--{self.name} {file}: get_config() returned {type(config).__name__}, "
                "not an ml_collections.ConfigDict"
            )
        return config


def define_config_file(
    name: str, help_string: str, flag_values: flags.FlagValues = flags.FLAGS, **kwargs: Any
) -> Any:
    """``config_flags.DEFINE_config_file(name, ...)`` (locked) whose file errors are one line."""
    holder = config_flags.DEFINE_config_file(
        name, help_string=help_string, flag_values=flag_values, lock_config=True, **kwargs
    )
    flag_values[name].parser = _ConfigFileParser(name, lock_config=True)
    return holder


def flags_parser(
    required: Sequence[str] = (), commands: Sequence[str] = (), usage: str = ""
) -> Callable[[list[str]], list[str]]:
    """For ``app.run(main, flags_parser=...)``: parses ``flags.FLAGS`` as absl does, but a bad
    command line is one ``error:`` line and exit code 2 (absl: a ``FATAL`` line, usage and 1; or
    ml_collections' traceback). The flags in ``required`` must be given and not empty; the
    positional arguments must be one of ``commands`` (none if ``commands`` is empty). ``--help``
    prints ``usage`` (the command's docstring) and every flag of the command
    (``cli_help``), and exits with 0."""

    def parse(argv: list[str]) -> list[str]:
        if cli_help.asks_for_help(argv[1:]):
            sys.stdout.write(cli_help.help_text(usage))
            sys.exit(0)
        try:
            rest = flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as err:
            fail(flag_error_line(err, argv))
        for name in required:
            if flags.FLAGS[name].value in (None, ""):
                missing = "is required" if flags.FLAGS[name].value is None else "is empty"
                fail(f"--{name} {missing}: {flags.FLAGS[name].help}")
        extra = rest[1:]
        if commands and (len(extra) != 1 or extra[0] not in commands):
            given = f"got {' '.join(extra)!r}" if extra else "none given"
            fail(f"expected the command {' or '.join(commands)} as the one argument ({given})")
        if not commands and extra:
            fail(f"unexpected argument {extra[0]!r} (flags only, e.g. --workdir=DIR)")
        return rest

    return parse


# Set in a cluster's processes: ``--distributed=auto`` initialises jax.distributed when one is.
CLUSTER_ENV_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
)


def define_distributed_flag() -> None:
    """``--distributed`` (auto/on/off), for every command that runs on all hosts of a pod."""
    flags.DEFINE_enum(
        "distributed",
        "auto",
        ["auto", "on", "off"],
        "Call jax.distributed.initialize(): 'auto' does when a cluster environment is detected.",
    )


# What jax.distributed.initialize() cannot detect on a cluster without SLURM, Open MPI, Cloud
# TPU or Kubernetes: the process count and this process's id (jax reads the coordinator's
# address itself from JAX_COORDINATOR_ADDRESS).
PROCESS_ENV_VARS = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def initialize_distributed(mode: str, cluster_env_vars: Sequence[str] = CLUSTER_ENV_VARS) -> None:
    """``jax.distributed.initialize()`` if ``mode`` is ``on``, or ``auto`` and one of
    ``cluster_env_vars`` is set, with ``num_processes`` and ``process_id`` from
    ``PROCESS_ENV_VARS`` where they are set. jax finds no cluster at once (it raises before
    connecting to anything): that is one ``error:`` line saying how to run single-process."""
    import jax

    found = [name for name in cluster_env_vars if os.environ.get(name)]
    if mode == "off" or (mode == "auto" and not found):
        return
    given = {}
    for arg, name in PROCESS_ENV_VARS.items():
        if value := os.environ.get(name):
            if not value.isdigit():
                fail(f"{name}={value!r}: expected a whole number")
            given[arg] = int(value)
    try:
        jax.distributed.initialize(**given)
    except ValueError as err:  # no coordinator address or process count: no cluster detected
        if mode == "on":
            asked, instead = "--distributed=on", "pass --distributed=off (or auto)"
        else:
            names = "/".join(found)
            asked, instead = f"{names} is set", f"unset {names} or pass --distributed=off"
        fail(f"{asked} but no cluster was found ({err}); to run as one process, {instead}")
    except RuntimeError as err:  # e.g. the coordinator did not answer in time
        fail(f"jax.distributed.initialize() failed: {error_line(err)}")
