"""``python -m benchmarks.epoch``: is the input side ever the bottleneck?

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

Usage (from the repository root; ``--config.KEY=VALUE`` sets any config field, as in
``train.py``)::

    python -m benchmarks.epoch --config configs/fashion_mnist_reference.py --torch \\
        --json bench/cpu_fashion_mnist_epoch.json
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import jax
from absl import flags

import moco_jax
from benchmarks import cli
from moco_jax.run.run_setup import load_data

TARGET_OVERHEAD = 0.05


def time_epoch(config: Any, steps: int = 0, repeats: int = 1, log=print) -> dict[str, Any]:
    """Seconds for ``steps`` (0: one epoch) training steps on real data and on fixed views."""
    mesh = moco_jax.mesh_for(config)  # validates the config before any data is read
    log(f"loading {config.dataset.name} ...")
    train_views = load_data(config, mesh).train_views
    per_epoch = train_views.steps_per_epoch
    steps = steps or per_epoch
    setup = moco_jax.build(config, per_epoch, mesh=mesh)
    train_step = setup.algorithm.train_step
    state = setup.initial_state()

    log("compiling ...")
    warm = per_epoch  # the first step of epoch 1: the timed run then starts epoch 0 afresh
    state, _ = train_step(state, *train_views(warm))
    fixed_views = jax.block_until_ready(train_views(warm + 1))

    def real(state):
        for step in range(steps):
            with jax.transfer_guard("disallow"):
                state, metrics = train_step(state, *train_views(step))
        return state, metrics

    def synthetic(state):
        for _ in range(steps):
            with jax.transfer_guard("disallow"):
                state, metrics = train_step(state, *fixed_views)
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


def run(values: flags.FlagValues, log=print) -> dict[str, Any]:
    config = values.config
    if values.torch:  # before TensorFlow loads: torchvision after it segfaults (tests/conftest.py)
        import torchvision  # noqa: F401
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "config_path": cli.config_path(values),
        "overrides": cli.report_overrides(cli.overrides(values)),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": config.num_devices or jax.device_count(),
        "jax_version": jax.__version__,
        "batch_size": config.batch_size,
    }
    if values.torch:
        from benchmarks import torch_epoch

        log("PyTorch: DataLoader + PIL augmentation + the official step ...")
        workers, threads = values.torch_workers, values.torch_threads
        report["torch"] = torch_epoch.time_torch_epoch(
            config, values.steps, workers=workers, threads=threads, log=log
        )
    report["jax"] = time_epoch(config, values.steps, values.repeats, log=log)
    if values.torch:
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


def _define(values: flags.FlagValues) -> None:
    integer = flags.DEFINE_integer
    integer("steps", 0, "steps per run (0: one epoch)", 0, flag_values=values)
    integer("repeats", 1, "real/synthetic pairs to run", 1, flag_values=values)
    flags.DEFINE_boolean("torch", False, "time a PyTorch epoch first", flag_values=values)
    integer("torch_workers", 2, "DataLoader workers", 0, flag_values=values)
    integer("torch_threads", 0, "0: PyTorch's default", 0, flag_values=values)
    flags.DEFINE_string("json", None, "write the report here", flag_values=values)


def parse_args(argv: list[str]) -> flags.FlagValues:
    values = cli.parse(
        argv,
        _define,
        prog="python -m benchmarks.epoch",
        description="Real-data training steps vs the same steps on views already on device; "
        "optionally a PyTorch DataLoader + PIL epoch of the same model.",
    )
    if values.config is None:
        raise cli.UsageError("--config is required (a config file, e.g. configs/smoke.py)")
    return values


def _main(argv: list[str]) -> int:
    values = parse_args(argv)
    report = run(values)
    print(describe(report))
    if values.json:
        cli.write_json(values.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(_main, argv, ImportError)


if __name__ == "__main__":
    sys.exit(main())
