"""Command line of the step benchmark (``python -m benchmarks --help``)."""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from benchmarks import cli
from benchmarks.collectives import collectives_worker
from benchmarks.presets import PRESETS, Options
from benchmarks.report import format_summary
from benchmarks.runner import run_benchmark

PROG = "python -m benchmarks"
DESCRIPTION = (
    "Time the MoCo training step; report throughput, compile time, memory, FLOPs, MFU, XLA "
    "floor, PyTorch ratio, bf16 loss and collective bytes as JSON. The preset names the config "
    "file unless --config gives one; --config.KEY=VALUE sets any config field."
)


def _define_preset(values: flags.FlagValues) -> None:
    flags.DEFINE_enum(
        "preset",
        "resnet18-cifar",
        list(PRESETS),
        "which config (from configs/) and batch to benchmark unless --config is given",
        flag_values=values,
    )


def _define(values: flags.FlagValues) -> None:
    _define_preset(values)
    integer, boolean = flags.DEFINE_integer, flags.DEFINE_boolean
    integer(
        "num_devices",
        0,
        "0: the config's num_devices (0 there: all visible devices)",
        lower_bound=0,
        flag_values=values,
    )
    flags.DEFINE_enum(
        "dtype",
        "auto",
        ["auto", "float32", "bfloat16"],
        "compute dtype; auto: bfloat16 on GPU/TPU, the config's on CPU",
        flag_values=values,
    )
    integer("steps", None, "timed steps per repeat (preset default)", 1, flag_values=values)
    integer("repeats", None, "timed repeats (preset default)", 1, flag_values=values)
    integer("warmup", None, "untimed steps first (preset default)", 0, flag_values=values)
    integer("loss_steps", None, "steps of the fp32/bf16 loss check; 0: off", 0, flag_values=values)
    boolean("torch", False, "time PyTorch side by side", flag_values=values)
    integer("torch_threads", 0, "PyTorch CPU threads (0: its default)", 0, flag_values=values)
    boolean("floor", True, "time the XLA floor (--nofloor skips it)", flag_values=values)
    integer(
        "floor_pairs",
        0,
        "also time the floor and then the step N times back to back (drift-proof ratio)",
        0,
        flag_values=values,
    )
    boolean(
        "collectives", True, "report the collectives (--nocollectives skips it)", flag_values=values
    )
    integer("collectives_devices", 8, "devices of the collectives report", 1, flag_values=values)
    boolean(
        "fit_batch",
        True,
        "halve the batch until it fits (--nofit_batch fails instead)",
        flag_values=values,
    )
    integer("seed", 0, "seed of the synthetic data", flag_values=values)
    flags.DEFINE_string("json", None, "write the report here ('-': stdout)", flag_values=values)
    # The collectives report's child process (benchmarks/collectives.py); not in --help.
    flags.DEFINE_string("collectives_worker", None, "", flag_values=values)


def parse_args(argv: list[str]) -> flags.FlagValues:
    """The command line; the preset's config file is ``--config``'s default."""
    preset = cli.peek(argv, _define_preset).preset
    return cli.parse(
        argv,
        _define,
        prog=PROG,
        description=DESCRIPTION,
        default_config=PRESETS[preset].config_file,
    )


def options_from(values: flags.FlagValues) -> Options:
    return Options(
        preset=values.preset,
        config_path=cli.config_path(values),
        overrides=cli.overrides(values),
        config=values.config,
        num_devices=values.num_devices,
        dtype=values.dtype,
        steps=values.steps,
        repeats=values.repeats,
        warmup=values.warmup,
        loss_steps=values.loss_steps,
        torch=values.torch,
        floor=values.floor,
        floor_pairs=values.floor_pairs,
        collectives=values.collectives,
        collectives_devices=values.collectives_devices,
        fit_batch=values.fit_batch,
        torch_threads=values.torch_threads,
        seed=values.seed,
    )


def _main(argv: list[str]) -> int:
    values = parse_args(argv)
    if values.torch:
        # On a GPU, JAX would otherwise take 75% of its memory up front and starve PyTorch.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if values.collectives_worker:
        print(json.dumps(collectives_worker(values.collectives_worker, values.collectives_devices)))
        return 0

    quiet = values.json == "-"
    report = run_benchmark(options_from(values), log=(lambda _: None) if quiet else print)
    if quiet:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
        if values.json:
            cli.write_json(values.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
