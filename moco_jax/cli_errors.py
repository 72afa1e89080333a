"""Command-line entry points turn expected failures into one clear line and exit code 2.

A run stopped by SIGTERM (preemption) after saving its state prints one ``stopped:`` line and exits
with 143 (128 + SIGTERM), as a process killed by the signal would: schedulers that requeue
preempted jobs see the usual code, and rerunning the same command resumes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from moco_jax.data.tfds_source import DatasetError
from moco_jax.validation import ConfigError

EXPECTED_ERRORS = (ConfigError, DatasetError, OSError)


def quiet_library_logs() -> None:
    """Library INFO logs (orbax, TFDS) drown the progress bar: show warnings unless asked."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


PREEMPTED_EXIT_CODE = 128 + 15


def run_with_clear_errors(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn``; a config, dataset, file-system, checkpoint or divergence error prints one line
    and exits with 2; a preemption prints one line and exits with 143."""
    from moco_jax.checkpointing import CheckpointError, Preempted, TrainingDiverged

    try:
        return fn(*args)
    except (*EXPECTED_ERRORS, CheckpointError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Preempted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
