"""``python -m moco_jax.benchmark.epoch``: is the input side ever the bottleneck?

Times the trainer's loop body over real data (the dataset prepared and loaded as ``train.py``
does; the epoch's index table, gather, crop and every augmentation on device for resident
datasets, the host crop stream for the others) against the same number of steps on one pair of
augmented views already on device ("synthetic"). ``input_overhead`` = real / synthetic - 1; the
target is <= 5%.

The real run starts at step 0 of an epoch, so it pays what an epoch start costs in training
(the new index table, or a fresh crop stream); warm-up (compiling both functions) runs at
another epoch's first step beforehand. The two runs alternate ``repeats`` times; medians are
reported. Logging and checkpoints are left out: they are not the input side.

``--torch`` (needs torch and torchvision) first trains the same model with PyTorch for the same
steps, fed by a ``DataLoader`` with PIL augmentations as the official code does
(``torch_epoch.py``), in the same process, and reports the epoch times side by side.

Usage::

    python -m moco_jax.benchmark.epoch --config configs/fashion_mnist_reference.py --torch \\
        --json bench/cpu_fashion_mnist_epoch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import jax

from moco_jax.benchmark.runner import apply_override, load_config_file
from moco_jax.engine import build_engine
from moco_jax.mesh import make_data_mesh
from moco_jax.run_setup import load_data
from moco_jax.step import DATA_AXIS
from moco_jax.validation import ConfigError, validate_config, validate_run_config

TARGET_OVERHEAD = 0.05


def time_epoch(config: Any, steps: int = 0, repeats: int = 1, log=print) -> dict[str, Any]:
    """Seconds for ``steps`` (0: one epoch) training steps on real data and on fixed views."""
    validate_run_config(config, jax.device_count())
    mesh = make_data_mesh(config.num_devices or None)
    validate_config(config, mesh.shape[DATA_AXIS])
    log(f"loading {config.dataset.name} ...")
    train_views = load_data(config, mesh).train_views
    per_epoch = train_views.steps_per_epoch
    steps = steps or per_epoch
    engine = build_engine(config, mesh, per_epoch)
    dataset = config.dataset
    image_shape = (dataset.image_size, dataset.image_size, dataset.num_channels)
    state = engine.init_state(jax.random.key(config.seed), image_shape, config.moco.queue_size)

    log("compiling ...")
    warm = per_epoch  # the first step of epoch 1: the timed run then starts epoch 0 afresh
    state, _ = engine.train_step(state, *train_views(warm))
    fixed_views = jax.block_until_ready(train_views(warm + 1))

    def real(state):
        for step in range(steps):
            with jax.transfer_guard("disallow"):
                state, metrics = engine.train_step(state, *train_views(step))
        return state, metrics

    def synthetic(state):
        for _ in range(steps):
            with jax.transfer_guard("disallow"):
                state, metrics = engine.train_step(state, *fixed_views)
        return state, metrics

    samples: dict[str, list[float]] = {"synthetic": [], "real": []}
    for repeat in range(repeats):
        for name, run in (("synthetic", synthetic), ("real", real)):
            log(f"repeat {repeat + 1}/{repeats}: {steps} steps, {name} input ...")
            start = time.perf_counter()
            state, metrics = run(state)
            jax.block_until_ready((state, metrics))
            samples[name].append(time.perf_counter() - start)
    real_s, synthetic_s = (statistics.median(samples[k]) for k in ("real", "synthetic"))
    images = steps * config.batch_size
    overhead = real_s / synthetic_s - 1.0
    return {
        "steps": steps,
        "steps_per_epoch": per_epoch,
        "repeats": repeats,
        "real_s": real_s,
        "synthetic_s": synthetic_s,
        "samples_s": samples,
        "real_images_per_sec": images / real_s,
        "synthetic_images_per_sec": images / synthetic_s,
        "input_overhead": overhead,
        "target_overhead": TARGET_OVERHEAD,
        "within_target": overhead <= TARGET_OVERHEAD,
        "last_loss": float(metrics["loss"]),
    }


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    config = load_config_file(args.config_path)
    for assignment in args.override:
        apply_override(config, assignment)
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "config_path": args.config_path,
        "overrides": list(args.override),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": config.num_devices or jax.device_count(),
        "jax_version": jax.__version__,
        "batch_size": config.batch_size,
    }
    if args.torch:
        from moco_jax.benchmark import torch_epoch

        log("PyTorch: DataLoader + PIL augmentation + the official step ...")
        report["torch"] = torch_epoch.time_torch_epoch(
            config, args.steps, workers=args.torch_workers, threads=args.torch_threads, log=log
        )
    report["jax"] = time_epoch(config, args.steps, args.repeats, log=log)
    if args.torch:
        report["jax_over_torch"] = (  # images/sec over the same steps; > 1: JAX is faster
            report["jax"]["real_images_per_sec"] / report["torch"]["images_per_sec"]
        )
    return report


def describe(report: dict[str, Any]) -> str:
    jax_side = report["jax"]
    lines = [
        f"{jax_side['steps']} steps of batch {report['batch_size']} on "
        f"{report['num_devices']} x {report['device_kind']} (jax {report['jax_version']})",
        f"  real data (input pipeline + augmentation + step): {jax_side['real_s']:.1f} s "
        f"({jax_side['real_images_per_sec']:.1f} img/s)",
        f"  synthetic views already on device:               {jax_side['synthetic_s']:.1f} s "
        f"({jax_side['synthetic_images_per_sec']:.1f} img/s)",
        f"  input overhead {100 * jax_side['input_overhead']:+.1f}% "
        f"(target <= {100 * TARGET_OVERHEAD:.0f}%: "
        f"{'met' if jax_side['within_target'] else 'NOT met'})",
    ]
    if "torch" in report:
        torch_side = report["torch"]
        lines.append(
            f"  PyTorch {torch_side['torch_version']} DataLoader ({torch_side['workers']} workers)"
            f" + PIL + official step: {torch_side['epoch_s']:.1f} s "
            f"({torch_side['images_per_sec']:.1f} img/s); JAX / PyTorch images/sec "
            f"{report['jax_over_torch']:.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moco_jax.benchmark.epoch",
        description="Real-data training steps vs the same steps on views already on device; "
        "optionally a PyTorch DataLoader + PIL epoch of the same model.",
    )
    parser.add_argument("--config", dest="config_path", required=True, help="a config file")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="set a config field"
    )
    parser.add_argument("--steps", type=int, default=0, help="steps per run (0: one epoch)")
    parser.add_argument("--repeats", type=int, default=1, help="real/synthetic pairs to run")
    parser.add_argument("--torch", action="store_true", help="time a PyTorch epoch first")
    parser.add_argument("--torch_workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--torch_threads", type=int, default=0, help="0: PyTorch's default")
    parser.add_argument("--json", dest="json_path", help="write the report here")
    args, unknown = parser.parse_known_args(argv)
    for token in unknown:  # ml_collections style --config.a.b=value
        if not (token.startswith("--config.") and "=" in token):
            parser.error(f"unrecognized argument {token}")
        args.override.append(token[2:])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = run(args)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
