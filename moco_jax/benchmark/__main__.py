"""Command line of the benchmark (``python -m moco_jax.benchmark --help``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

PRESET_NAMES = ("tiny", "fashion-mnist", "resnet18-cifar", "resnet50")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moco_jax.benchmark",
        allow_abbrev=False,
        description="Time the MoCo training step; report throughput, compile time, memory, "
        "FLOPs, MFU, XLA floor, PyTorch ratio, bf16 loss and collective bytes as JSON.",
    )
    parser.add_argument("--preset", choices=PRESET_NAMES, default="resnet18-cifar")
    parser.add_argument("--config", dest="config_path", help="a config file instead of a preset")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config field (repeatable); --config.KEY=VALUE works too",
    )
    parser.add_argument(
        "--num_devices",
        type=int,
        default=0,
        help="0: the config's num_devices (0 there: all visible devices)",
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--steps", type=int, help="timed steps per repeat (preset default)")
    parser.add_argument("--repeats", type=int, help="timed repeats (preset default)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (preset default)")
    parser.add_argument("--loss_steps", type=int, help="steps of the fp32/bf16 loss check; 0: off")
    parser.add_argument("--torch", action="store_true", help="time PyTorch side by side")
    parser.add_argument(
        "--torch_threads", type=int, default=0, help="PyTorch CPU threads (0: its default)"
    )
    parser.add_argument("--no_floor", dest="floor", action="store_false")
    parser.add_argument(
        "--floor_pairs",
        type=int,
        default=0,
        help="also time the floor and then the step N times back to back (drift-proof ratio)",
    )
    parser.add_argument("--no_collectives", dest="collectives", action="store_false")
    parser.add_argument("--collectives_devices", type=int, default=8)
    parser.add_argument(
        "--no_fit_batch", dest="fit_batch", action="store_false", help="fail instead of halving"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--json", dest="json_path", help="write the report here ('-': stdout)")
    parser.add_argument("--collectives_worker", help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    # ml_collections style: --config.a.b=value or --config.a.b value.
    index = 0
    while index < len(unknown):
        token = unknown[index]
        if not token.startswith("--config."):
            parser.error(f"unrecognized argument {token}")
        if "=" in token:
            args.override.append(token[2:])
        elif index + 1 < len(unknown):
            index += 1
            args.override.append(f"{token[2:]}={unknown[index]}")
        else:
            parser.error(f"{token} needs a value")
        index += 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.torch:
        # On a GPU, JAX would otherwise take 75% of its memory up front and starve PyTorch.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.collectives_worker:
        from moco_jax.benchmark.runner import collectives_worker

        report = collectives_worker(args.collectives_worker, args.collectives_devices)
        print(json.dumps(report))
        return 0

    from moco_jax.benchmark.runner import Options, format_summary, run_benchmark
    from moco_jax.validation import ConfigError

    options = Options(
        preset=args.preset,
        config_path=args.config_path,
        overrides=tuple(args.override),
        num_devices=args.num_devices,
        dtype=args.dtype,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        loss_steps=args.loss_steps,
        torch=args.torch,
        floor=args.floor,
        floor_pairs=args.floor_pairs,
        collectives=args.collectives,
        collectives_devices=args.collectives_devices,
        fit_batch=args.fit_batch,
        torch_threads=args.torch_threads,
        seed=args.seed,
    )
    quiet = args.json_path == "-"
    try:
        report = run_benchmark(options, log=(lambda _: None) if quiet else print)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if quiet:
        print(text)
    else:
        print(format_summary(report))
        if args.json_path:
            with open(args.json_path, "w") as f:
                f.write(text + "\n")
            print(f"report written to {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
