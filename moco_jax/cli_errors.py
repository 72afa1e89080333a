"""Command-line entry points turn expected failures into one clear line and exit code 2."""

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


def run_with_clear_errors(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn``; a config, dataset, file-system or divergence error prints one line and exits."""
    from moco_jax.trainer import TrainingDiverged

    try:
        return fn(*args)
    except (*EXPECTED_ERRORS, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
