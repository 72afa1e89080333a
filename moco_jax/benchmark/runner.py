"""Presets, config resolution and the benchmark run itself (see ``moco_jax/benchmark/__init__``)."""

from __future__ import annotations

import ast
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moco_jax.benchmark import compiled as compiled_info
from moco_jax.benchmark.floor import floor_pairs, forward_matmul_flops, xla_floor
from moco_jax.benchmark.inputs import SyntheticViews
from moco_jax.engine import Engine, build_engine
from moco_jax.mesh import batch_sharding, make_data_mesh
from moco_jax.models import build_encoder
from moco_jax.state import create_state
from moco_jax.step import DATA_AXIS

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The lr schedule is per epoch; a long epoch keeps it at its peak for every benchmarked step.
STEPS_PER_EPOCH = 1_000_000
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Preset:
    """A config from ``configs/`` plus the benchmark's batch and default run lengths."""

    config_module: str
    global_batch: int | None = None  # None: keep the config's
    per_device_batch: int | None = None  # global batch = this x devices
    bn_groups: int | None = None  # BN groups per device (bn_group_size = per-device batch / it)
    steps: int = 10
    repeats: int = 5
    warmup: int = 3
    loss_steps: int = 20


PRESETS = {
    "tiny": Preset("smoke", steps=2, repeats=3, warmup=1, loss_steps=3),
    "fashion-mnist": Preset("fashion_mnist_reference"),
    "resnet18-cifar": Preset("moco_v2_cifar", global_batch=256, bn_groups=8),
    "resnet50": Preset("moco_v2_imagenet", per_device_batch=256, loss_steps=10),
}


@dataclasses.dataclass
class Options:
    """Everything the command line sets; ``None`` run lengths come from the preset."""

    preset: str = "resnet18-cifar"
    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    num_devices: int = 0
    dtype: str = "auto"
    steps: int | None = None
    repeats: int | None = None
    warmup: int | None = None
    loss_steps: int | None = None
    torch: bool = False
    floor: bool = True
    floor_pairs: int = 0  # extra (floor, step) pairs taken back to back
    collectives: bool = True
    collectives_devices: int = 8
    fit_batch: bool = True
    torch_threads: int = 0  # 0: PyTorch's default
    seed: int = 0


# --- Config. ---


def _import_configs(name: str):
    try:
        return importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO_ROOT))  # run from outside the repository
        return importlib.import_module(f"configs.{name}")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file such as ``configs/moco_v2_cifar.py``."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # config files import ``configs.*``
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _parse_value(text: str, current: Any) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> str:
    """Apply ``a.b.c=value`` (value parsed as a Python literal, else a string); returns the key."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form key=value")
    key, text = assignment.split("=", 1)
    key = key.strip()
    if key.startswith("config."):
        key = key[len("config.") :]
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
        if parent not in node:
            raise ValueError(f"override {key!r}: no config field {parent!r}")
        node = node[parent]
    if leaf not in node:
        raise ValueError(f"override {key!r}: no config field {leaf!r}")
    try:
        node[leaf] = _parse_value(text.strip(), node[leaf])
    except TypeError as err:  # ConfigDict refuses a value of the wrong type
        raise ValueError(f"override {key!r}: {err}") from err
    return key


def resolve_config(options: Options) -> tuple[ml_collections.ConfigDict, Preset]:
    """The run's config: preset (or file), benchmark batch, dtype, then the overrides."""
    preset = PRESETS[options.preset]
    if options.config_path:
        config = load_config_file(options.config_path)
        preset = dataclasses.replace(preset, global_batch=None, per_device_batch=None)
        preset = dataclasses.replace(preset, bn_groups=None)
    else:
        config = _import_configs(preset.config_module).get_config()
    overridden = {apply_override(config, o) for o in options.overrides}

    num_devices = options.num_devices or config.num_devices or jax.device_count()
    config.num_devices = num_devices
    if "batch_size" not in overridden:
        if preset.per_device_batch:
            config.batch_size = preset.per_device_batch * num_devices
        elif preset.global_batch:
            config.batch_size = preset.global_batch
    if preset.bn_groups and "model.bn_group_size" not in overridden:
        config.model.bn_group_size = config.batch_size // num_devices // preset.bn_groups
    if options.dtype != "auto":
        config.model.dtype = options.dtype
    elif "model.dtype" not in overridden and jax.default_backend() != "cpu":
        config.model.dtype = "bfloat16"  # accelerators: bf16 compute, fp32 parameters
    return config, preset


# --- Timing. ---


def _summary(samples_s: list[float], batch: int) -> dict[str, Any]:
    """Median and spread of per-repeat step times and the images/sec they give."""
    ips = [batch / t for t in samples_s]
    median_ips = statistics.median(ips)
    return {
        "images_per_sec": {
            "median": median_ips,
            "min": min(ips),
            "max": max(ips),
            "spread": (max(ips) - min(ips)) / median_ips,
            "per_repeat": ips,
        },
        "step_ms": {
            "median": statistics.median(samples_s) * 1e3,
            "min": min(samples_s) * 1e3,
            "max": max(samples_s) * 1e3,
        },
    }


def timed_loop(
    state: Any,
    one_step: Callable[[Any, Any], tuple[Any, Any]],
    per_step_args: list[Any],
    steps: int,
    repeats: int,
    warmup: int,
) -> tuple[Any, list[float]]:
    """Run ``one_step`` ``warmup`` times, then ``repeats`` x ``steps`` times, timing each repeat.

    The timed steps run under ``jax.transfer_guard("disallow")``: any host<->device transfer
    inside the loop (a Python scalar, a NumPy array, a fetched metric) raises instead of being
    silently timed. Each repeat ends with ``block_until_ready``.
    """
    index = 0
    out = None
    for _ in range(warmup):
        state, out = one_step(state, per_step_args[index % len(per_step_args)])
        index += 1
    jax.block_until_ready((state, out))
    samples = []
    with jax.transfer_guard("disallow"):
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                state, out = one_step(state, per_step_args[index % len(per_step_args)])
                index += 1
            jax.block_until_ready((state, out))
            samples.append((time.perf_counter() - start) / steps)
    return state, samples


# --- Compilation helpers. ---


def abstract_state(engine: Engine, config: Any) -> Any:
    """Shapes, dtypes and (replicated) shardings of a fresh state, without allocating it."""
    size, channels = config.dataset.image_size, config.dataset.num_channels
    shapes = jax.eval_shape(
        lambda r: create_state(
            r, engine.model, engine.optimizer, (size, size, channels), config.moco.queue_size
        ),
        jax.random.key(0),
    )
    replicated = NamedSharding(engine.mesh, P())
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
    )


def abstract_images(engine: Engine, config: Any) -> jax.ShapeDtypeStruct:
    size, channels = config.dataset.image_size, config.dataset.num_channels
    return jax.ShapeDtypeStruct(
        (config.batch_size, size, size, channels), jnp.float32, sharding=batch_sharding(engine.mesh)
    )


def collectives_on_mesh(config: Any, num_devices: int) -> dict[str, Any]:
    """Compile the step for ``num_devices`` devices of this process (nothing is allocated)."""
    config = config.copy_and_resolve_references()
    config.num_devices = num_devices
    mesh = make_data_mesh(num_devices)
    engine = build_engine(config, mesh, STEPS_PER_EPOCH)
    images = abstract_images(engine, config)
    compiled = engine.train_step.trace(abstract_state(engine, config), images, images)
    compiled = compiled.lower().compile()
    size, channels = config.dataset.image_size, config.dataset.num_channels
    report = compiled_info.collective_report(
        compiled.as_text(), num_devices, config.batch_size, (size, size, channels), config.model.dim
    )
    report["platform"] = jax.devices()[0].platform
    return report


def collectives_in_subprocess(config: Any, num_devices: int) -> dict[str, Any]:
    """``collectives_on_mesh`` in a fresh process with ``num_devices`` fake CPU devices."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(config.to_json())
        path = f.name
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "moco_jax.benchmark", "--collectives_worker", path]
    command += ["--collectives_devices", str(num_devices)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise RuntimeError(f"collectives worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def collectives_worker(config_json_path: str, num_devices: int) -> dict[str, Any]:
    config = ml_collections.ConfigDict(json.loads(pathlib.Path(config_json_path).read_text()))
    return collectives_on_mesh(config, num_devices)


# --- The run. ---


def _loss_curves(
    config: Any,
    engine: Engine,
    initial_state: Callable[[], Any],
    main_step: Callable,
    views: SyntheticViews,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Loss per step of a short run in float32 and bfloat16 from the same start and data.

    All runs start from the same state (parameters are float32 in both dtypes). The noise
    reference is a float32 run on other data (another seed of the synthetic indices and
    augmentation keys). ``within_noise``: over the second half of the run, the largest
    |bf16 - fp32| loss difference is no larger than the largest |fp32 data a - fp32 data b|.
    """

    def run(step_fn, run_seed):
        state = initial_state()
        run_views = views if run_seed == seed else SyntheticViews(engine.mesh, config, run_seed)
        losses = []
        for step in range(steps):
            state, metrics = step_fn(state, *run_views(step))
            losses.append(metrics["loss"])
        return [float(x) for x in jax.device_get(losses)]

    other = config.copy_and_resolve_references()
    other.model.dtype = "bfloat16" if config.model.dtype == "float32" else "float32"
    steps_by_dtype = {
        config.model.dtype: main_step,
        other.model.dtype: build_engine(other, engine.mesh, STEPS_PER_EPOCH).train_step,
    }
    curves = {dtype: run(steps_by_dtype[dtype], seed) for dtype in ("float32", "bfloat16")}
    reference = run(steps_by_dtype["float32"], seed + 1)
    tail = slice(steps // 2, steps)
    bf16_diff = max(
        abs(a - b) for a, b in zip(curves["bfloat16"][tail], curves["float32"][tail], strict=True)
    )
    seed_diff = max(
        abs(a - b) for a, b in zip(reference[tail], curves["float32"][tail], strict=True)
    )
    return {
        "steps": steps,
        "float32": curves["float32"],
        "bfloat16": curves["bfloat16"],
        "float32_other_seed": reference,
        "bf16_vs_fp32_max_abs_diff": bf16_diff,
        "fp32_seed_max_abs_diff": seed_diff,
        "within_noise": bool(bf16_diff <= seed_diff),
        "method": (
            "same initial state and data in both dtypes; noise = fp32 on other data (seed+1); "
            "compared over the second half of the steps"
        ),
    }


class _Phases:
    """Wall seconds of each part of the run (``report["phase_seconds"]``)."""

    def __init__(self, log: Callable[[str], None]):
        self.seconds: dict[str, float] = {}
        self._log = log
        self._name: str | None = None
        self._start = 0.0

    def start(self, name: str, message: str) -> None:
        self.stop()
        self._log(message)
        self._name, self._start = name, time.perf_counter()

    def stop(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = time.perf_counter() - self._start
            self._name = None


def _device_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every backend implements it
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def run_benchmark(options: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Benchmark the training step; returns the report (see the package docstring)."""
    config, preset = resolve_config(options)
    steps = options.steps or preset.steps
    repeats = options.repeats or preset.repeats
    warmup = preset.warmup if options.warmup is None else options.warmup
    loss_steps = preset.loss_steps if options.loss_steps is None else options.loss_steps
    while True:
        try:
            return _run(config, options, steps, repeats, warmup, loss_steps, log)
        except Exception as err:  # JAX's or PyTorch's out-of-memory error: halve the batch
            message = str(err)
            too_big = "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()
            if not (too_big and options.fit_batch and config.batch_size >= 4 * config.num_devices):
                raise
            log(f"batch {config.batch_size} does not fit ({message[:120]}...); halving it")
            config.batch_size //= 2
            if config.model.bn_group_size:
                config.model.bn_group_size = max(1, config.model.bn_group_size // 2)
            gc.collect()
            jax.clear_caches()


def _run(config, options, steps, repeats, warmup, loss_steps, log) -> dict[str, Any]:
    mesh = make_data_mesh(config.num_devices)
    num_devices = mesh.shape[DATA_AXIS]
    size, channels = config.dataset.image_size, config.dataset.num_channels
    image_shape = (size, size, channels)
    batch = config.batch_size
    per_device_batch = batch // num_devices
    device = jax.devices()[0]
    phases = _Phases(log)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "preset": None if options.config_path else options.preset,
        "config_path": options.config_path,
        "overrides": list(options.overrides),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": num_devices,
        "jax_version": jax.__version__,
        "dtype": config.model.dtype,
        "global_batch": batch,
        "per_device_batch": per_device_batch,
        "image_shape": list(image_shape),
        "model": {
            "backbone": config.model.backbone,
            "width_multiplier": config.model.width_multiplier,
            "cifar_stem": config.model.cifar_stem,
            "head": config.model.head,
            "dim": config.model.dim,
            "bn_mode": config.model.bn_mode,
            "bn_group_size": config.model.bn_group_size,
            "queue_size": config.moco.queue_size,
        },
        "run": {"steps": steps, "repeats": repeats, "warmup": warmup},
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "config": json.loads(config.to_json()),
    }

    # PyTorch first: on a GPU it then gets the memory before JAX's step and data take theirs.
    report["torch"] = None
    torch_result = None
    if options.torch:
        from moco_jax.benchmark import torch_side

        if not torch_side.torch_available():
            report["torch"] = {"skipped": "torch is not installed"}
        elif config.model.backbone not in ("resnet18", "resnet34", "resnet50"):
            report["torch"] = {"skipped": f"no PyTorch version of {config.model.backbone}"}
        else:
            phases.start("torch", "timing the PyTorch re-statement ...")
            torch_result = torch_side.time_torch_step(
                config, per_device_batch, steps, repeats, warmup, threads=options.torch_threads
            )

    # --- Build, compile, analyse. ---
    phases.start("build", f"building {config.model.backbone} on {num_devices} x {device} ...")
    engine = build_engine(config, mesh, STEPS_PER_EPOCH)
    state = engine.init_state(jax.random.key(config.seed), image_shape, config.moco.queue_size)
    copy_state = jax.jit(lambda s: jax.tree.map(jnp.copy, s))
    initial_state = copy_state(state)  # for the loss check (the timed state gets donated)
    views = SyntheticViews(mesh, config, seed=options.seed)
    phases.start("compile", "compiling ...")
    start = time.perf_counter()
    images_q, images_k = jax.block_until_ready(views(0))  # the first call compiles
    augment_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    traced = engine.train_step.trace(state, images_q, images_k)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered = traced.lower()
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    step = lowered.compile()
    compile_s = time.perf_counter() - start
    report["compile"] = {
        "step_trace_s": trace_s,
        "step_lower_s": lower_s,
        "step_compile_s": compile_s,
        "augment_compile_s": augment_compile_s,
    }
    phases.start("analysis", f"step compiled in {trace_s + lower_s + compile_s:.1f}s; analysing")
    report["memory"] = compiled_info.memory_report(step)
    cost = compiled_info.cost_report(step)
    flop_model = build_encoder(config.model, None)  # same convs; BN without a mesh axis
    per_device = jax.ShapeDtypeStruct((per_device_batch, *image_shape), jnp.float32)
    forward = forward_matmul_flops(flop_model, state.query_variables(), per_device)
    dim, queue = config.model.dim, config.moco.queue_size
    model_flops_per_image = 4 * forward / per_device_batch + 4 * dim * (queue + 1)
    peak, peak_source = compiled_info.peak_flops(device.device_kind)
    xla_per_image = cost["flops"] * num_devices / batch if cost["flops"] is not None else None
    report["flops"] = {
        "xla_flops_per_step_per_device": cost["flops"],
        "xla_flops_per_image": xla_per_image,
        "xla_bytes_accessed_per_step_per_device": cost["bytes_accessed"],
        "encoder_forward_flops_per_image": forward / per_device_batch,
        "model_flops_per_image": model_flops_per_image,
        "peak_flops_per_device": peak,
        "peak_flops_dtype": "bfloat16 dense" if peak else None,
        "peak_flops_source": peak_source,
    }

    # --- Donation: the state's old buffers must be gone after a call. ---
    old_leaves = jax.tree.leaves(state)
    state, _ = step(state, images_q, images_k)
    donated = sum(bool(x.is_deleted()) for x in old_leaves)
    report["donation"] = {
        "state_leaves": len(old_leaves),
        "donated_leaves": donated,
        "all_donated": donated == len(old_leaves),
    }

    # --- Timed variants (under jax.transfer_guard("disallow")). ---
    phases.start("time_step", "timing the step on pre-augmented views ...")
    variants = {}
    state, samples = timed_loop(
        state, lambda s, a: step(s, *a), [(images_q, images_k)], steps, repeats, warmup
    )
    variants["step"] = _summary(samples, batch)
    phases.start("time_step_with_augment", "timing augmentation + step ...")
    per_step = list(range(1, 1 + warmup + steps * repeats))  # global steps, in order

    def augment_and_step(s, global_step):
        return step(s, *views(global_step))

    state, samples = timed_loop(state, augment_and_step, per_step, steps, repeats, warmup)
    variants["step_with_augment"] = _summary(samples, batch)
    for result in variants.values():
        ips = result["images_per_sec"]["median"]
        capacity = peak * num_devices if peak else None
        result["mfu"] = model_flops_per_image * ips / capacity if capacity else None
        result["xla_flops_utilization"] = (
            xla_per_image * ips / capacity if capacity and xla_per_image else None
        )
    report["variants"] = variants
    report["transfer_guard"] = "disallow"  # the timed loops above ran under it
    report["memory"]["device_peak_bytes_in_use"] = _device_peak_bytes()
    del state, per_step

    # --- XLA floor of the convolutions and matmuls. ---
    report["floor"] = None
    if options.floor:
        phases.start("floor", "timing the step's convolutions and matmuls alone (XLA floor) ...")
        floor = xla_floor(traced.jaxpr, device)
        step_ms = variants["step"]["step_ms"]["median"]
        floor["step_ms"] = step_ms
        floor["step_over_floor"] = step_ms / floor["floor_ms"] if floor["floor_ms"] else None
        floor["comparable"] = num_devices == 1
        if options.floor_pairs > 0:
            phases.start("floor_pairs", f"{options.floor_pairs} x (floor, then step) ...")
            pair_state = copy_state(initial_state)

            def time_step() -> float:
                nonlocal pair_state
                pair_state, samples = timed_loop(
                    pair_state, lambda s, a: step(s, *a), [(images_q, images_k)], steps, 3, 1
                )
                return statistics.median(samples)

            floor.update(floor_pairs(traced.jaxpr, device, time_step, options.floor_pairs))
            del pair_state
        report["floor"] = floor

    # --- PyTorch side by side. ---
    if torch_result is not None:
        torch_summary = _summary(torch_result.pop("samples_s"), per_device_batch)
        torch_result.update(torch_summary)
        jax_per_device = variants["step"]["images_per_sec"]["median"] / num_devices
        torch_result["jax_images_per_sec_per_device"] = jax_per_device
        torch_result["jax_over_torch"] = jax_per_device / torch_summary["images_per_sec"]["median"]
        report["torch"] = torch_result

    # --- Mixed precision: a short loss curve in both dtypes. ---
    report["loss_check"] = None
    if loss_steps > 0:
        phases.start("loss_check", f"loss curves, float32 vs bfloat16, {loss_steps} steps ...")
        report["loss_check"] = _loss_curves(
            config, engine, lambda: copy_state(initial_state), step, views, loss_steps, options.seed
        )

    # --- Collectives on an n-device mesh. ---
    report["collectives"] = None
    if options.collectives:
        n = options.collectives_devices
        phases.start("collectives", f"collectives of the step on {n} devices ...")
        if num_devices == n:
            report["collectives"] = compiled_info.collective_report(
                step.as_text(), n, batch, image_shape, config.model.dim
            )
            report["collectives"]["platform"] = jax.default_backend()
        elif jax.device_count() >= n:
            report["collectives"] = collectives_on_mesh(config, n)
        else:
            report["collectives"] = collectives_in_subprocess(config, n)
    phases.stop()
    report["phase_seconds"] = phases.seconds
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines of a report."""
    lines = [
        f"{report['preset'] or report['config_path']}: {report['model']['backbone']} "
        f"{report['dtype']}, batch {report['global_batch']} on {report['num_devices']} x "
        f"{report['device_kind']}",
        f"compile {report['compile']['step_compile_s']:.1f}s, peak memory estimate "
        f"{(report['memory']['peak_bytes_estimate'] or 0) / 2**20:.1f} MiB/device, "
        f"model GFLOP/image {report['flops']['model_flops_per_image'] / 1e9:.3f}",
    ]
    for name, v in report["variants"].items():
        ips = v["images_per_sec"]
        mfu = f", MFU {100 * v['mfu']:.1f}%" if v["mfu"] is not None else ""
        lines.append(
            f"{name}: {ips['median']:.1f} images/sec (min {ips['min']:.1f}, max "
            f"{ips['max']:.1f}){mfu}"
        )
    if report["floor"]:
        f = report["floor"]
        lines.append(
            f"XLA floor (convs + matmuls alone): {f['floor_ms']:.2f} ms; step "
            f"{f['step_ms']:.2f} ms = {f['step_over_floor']:.2f}x floor"
        )
        if f.get("pairs"):
            ratios = ", ".join(f"{p['step_over_floor']:.2f}" for p in f["pairs"])
            lines.append(
                f"  (floor, step) pairs back to back: {ratios}; median "
                f"{f['step_over_floor_median']:.2f}x"
            )
    t = report.get("torch")
    if t and "jax_over_torch" in t:
        lines.append(
            f"PyTorch ({t['device']}): {t['images_per_sec']['median']:.1f} images/sec; "
            f"JAX / PyTorch = {t['jax_over_torch']:.2f}"
        )
    if report["loss_check"]:
        lc = report["loss_check"]
        lines.append(
            f"loss after {lc['steps']} steps: fp32 {lc['float32'][-1]:.4f}, bf16 "
            f"{lc['bfloat16'][-1]:.4f} (|diff| {lc['bf16_vs_fp32_max_abs_diff']:.4f}, seed noise "
            f"{lc['fp32_seed_max_abs_diff']:.4f})"
        )
    c = report["collectives"]
    if c:
        lines.append(
            f"collectives on {c['num_devices']} devices: {c['total_moved_bytes'] / 2**20:.2f} "
            f"MiB sent/device/step; Shuffle-BN images {c['shuffle_images_all_to_all_bytes']} B "
            f"vs gather-all {c['gather_all_images_bytes']} B ({c['shuffle_over_gather']:.4f})"
        )
    return "\n".join(lines)
