"""What the benchmarks' command lines share: absl flags with ml_collections' ``--config``.

``--config FILE`` loads ``get_config()`` of a config file and ``--config.KEY=VALUE`` sets any of
its fields, exactly as ``train.py`` does (``config_flags.DEFINE_config_file``). Each command line
is parsed into a fresh ``FlagValues``, so ``main(argv)`` can be called more than once in one
process (the tests do). A bad command line, config file or field is a ``UsageError``: one
``error:`` line and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import flags

from moco_jax.run import cli_help
from moco_jax.run.cli_errors import (
    EXIT_USAGE,
    EXPECTED_ERRORS,
    define_config_file,
    error_line,
    flag_error_line,
)

CONFIG_HELP = (
    "a config file (configs/*.py; default: the preset's); then --config.KEY=VALUE sets any of "
    "its fields, e.g. --config.moco.queue_size=128"
)
HIDDEN_FLAGS = ("collectives_worker", "help")  # a child process's; --help itself


class UsageError(ValueError):
    """A command line, config file or config field the benchmark cannot run with."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn absl's and ml_collections' parsing errors into ``UsageError``."""
    try:
        yield
    except (AttributeError, KeyError, OSError, flags.Error, TypeError, ValueError) as err:
        raise UsageError(flag_error_line(err)) from None


def peek(argv: Sequence[str], define: Callable[[flags.FlagValues], None]) -> flags.FlagValues:
    """The flags ``define`` declares, read from ``argv`` while every other flag is left alone:
    a first pass for the flags that decide how the rest is read (which config file is the
    default)."""
    values = flags.FlagValues()
    define(values)
    with usage_errors():
        values(["peek", *argv], known_only=True)
    return values


def parse(
    argv: Sequence[str],
    define: Callable[[flags.FlagValues], None],
    *,
    prog: str,
    description: str,
    default_config: str | None = None,
) -> flags.FlagValues:
    """``argv`` (without the program name) read into the flags ``define`` declares, ``--config``
    (``default_config`` where not given) and its ``--config.KEY=VALUE`` overrides. ``--help``
    prints the flags and exits with 0."""
    values = flags.FlagValues()
    define(values)
    flags.DEFINE_boolean("help", False, "show this help and exit", flag_values=values)
    full_argv = [prog, *argv]
    with usage_errors():
        define_config_file(
            "config", CONFIG_HELP, values, default=default_config, sys_argv=full_argv
        )
        rest = values(full_argv)
        if values.config is not None:
            values.config.get("seed")  # a file that failed to load raises here
    if values.help:
        usage = f"usage: {prog} [flags]\n\n{textwrap.fill(description, 80)}"
        print(cli_help.help_text(usage, values, hidden=HIDDEN_FLAGS), end="")
        sys.exit(0)
    if len(rest) > 1:
        raise UsageError(f"unexpected argument {rest[1]!r} (flags only)")
    return values


def overrides(values: flags.FlagValues) -> dict[str, Any]:
    """The ``--config.KEY=VALUE`` fields set on the command line, as ``{KEY: VALUE}``."""
    return dict(values["config"].override_values)


def config_path(values: flags.FlagValues) -> str | None:
    """The ``--config`` file given on the command line (None: the default one)."""
    return values["config"].config_filename if values["config"].present else None


def run_main(
    main: Callable[[list[str]], int], argv: list[str] | None, *expected: type[BaseException]
) -> int:
    """``main(argv)``'s exit code (``argv`` None: ``sys.argv[1:]``); a bad command line, config,
    value, file or dataset (or one of ``expected``) prints one ``error:`` line and gives 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except (*EXPECTED_ERRORS, ValueError, *expected) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_USAGE


def report_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """The report's ``overrides`` entry: ``KEY=VALUE`` strings."""
    return [f"{key}={value}" for key, value in overrides.items()]


def write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    print(f"report written to {path}")
