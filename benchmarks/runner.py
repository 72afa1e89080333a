"""The step benchmark's run: set up, compile, analyse, time, compare (see ``benchmarks``)."""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import moco_jax
from benchmarks import compiled as compiled_info
from benchmarks.cli import report_overrides
from benchmarks.collectives import collective_report, collectives_in_subprocess, collectives_on_mesh
from benchmarks.floor import floor_pairs, forward_matmul_flops, xla_floor
from benchmarks.inputs import SyntheticViews
from benchmarks.loss_check import loss_curves
from benchmarks.presets import STEPS_PER_EPOCH, Options, resolve_config
from benchmarks.timing import Phases, device_peak_bytes, summarize, timed_loop
from moco_jax.config.batch_rules import key_bn_group_size
from moco_jax.models import build_encoder
from moco_jax.models.encoder import build_predictor

SCHEMA_VERSION = 1


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


def _header(setup: moco_jax.Setup, options: Options, run: dict[str, int]) -> dict[str, Any]:
    config, num_devices = setup.config, setup.mesh.size
    return {
        "schema_version": SCHEMA_VERSION,
        "preset": None if options.config_path else options.preset,
        "config_path": options.config_path,
        "overrides": report_overrides(options.overrides),
        "backend": jax.default_backend(),
        "device_kind": setup.mesh.devices.flat[0].device_kind,
        "num_devices": num_devices,
        "jax_version": jax.__version__,
        "dtype": config.model.dtype,
        "global_batch": config.batch_size,
        "per_device_batch": config.batch_size // num_devices,
        "image_shape": list(setup.image_shape),
        "model": {
            "backbone": config.model.backbone,
            "width_multiplier": config.model.width_multiplier,
            "cifar_stem": config.model.cifar_stem,
            "head": config.model.head,
            "dim": config.model.dim,
            "bn_mode": config.model.bn_mode,
            # what the encoder is built with (one device, Shuffle-BN: 8 groups unless set)
            "bn_group_size": key_bn_group_size(
                config.model, config.batch_size // num_devices, num_devices
            ),
            "queue_size": config.moco.queue_size,
        },
        "run": run,
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "config": json.loads(config.to_json()),
    }


def _flops_report(setup, state, cost, peak, peak_source) -> dict[str, Any]:
    """XLA's FLOPs of the compiled step beside the model FLOPs MFU is computed from."""
    config, num_devices = setup.config, setup.mesh.size
    per_device_batch = config.batch_size // num_devices
    flop_model = build_encoder(config.model, None)  # same convs; BN without a mesh axis
    per_device = jax.ShapeDtypeStruct((per_device_batch, *setup.image_shape), jnp.float32)
    variables = setup.algorithm.encoder_variables(state)
    forward = forward_matmul_flops(flop_model, variables, per_device)
    model_flops = _model_flops(setup, state, forward / per_device_batch, per_device)
    xla_flops = cost["flops"]
    return {
        "xla_flops_per_step_per_device": xla_flops,
        "xla_flops_per_image": (
            xla_flops * num_devices / config.batch_size if xla_flops is not None else None
        ),
        "xla_bytes_accessed_per_step_per_device": cost["bytes_accessed"],
        "encoder_forward_flops_per_image": forward / per_device_batch,
        "model_flops_per_image": model_flops,
        "peak_flops_per_device": peak,
        "peak_flops_dtype": "bfloat16 dense" if peak else None,
        "peak_flops_source": peak_source,
    }


def _model_flops(setup, state, encoder_forward: float, per_device: jax.ShapeDtypeStruct) -> float:
    """Matmul FLOPs per image of one step, forward and backward (backward = 2x forward).

    v1/v2: the query encoder forward and backward (3x), the key encoder forward (1x), and the
    logits against the positive and the queue (forward and the gradient to q). v3: per view, the
    base encoder (3x) and predictor (3x) and the momentum encoder (1x), and the logits against
    the global batch of keys.
    """
    config = setup.config
    dim = config.model.dim
    if config.get("algorithm", "moco") != "moco_v3":
        return 4 * encoder_forward + 4 * dim * (config.moco.queue_size + 1)
    predictor = build_predictor(config.model, None)
    parts = setup.algorithm.parts(state)["predictor"]
    variables = {"params": parts["params"]}
    if parts["batch_stats"]:
        variables["batch_stats"] = parts["batch_stats"]
    embeddings = jax.ShapeDtypeStruct((per_device.shape[0], dim), jnp.float32)
    predictor_forward = forward_matmul_flops(predictor, variables, embeddings) / per_device.shape[0]
    return 2 * (4 * encoder_forward + 3 * predictor_forward + 4 * dim * config.batch_size)


def _torch_first(config, options, per_device_batch, run, phases) -> tuple[Any, Any]:
    """(report entry, raw result) of the PyTorch step, timed before JAX takes its memory."""
    if not options.torch:
        return None, None
    from benchmarks import torch_side

    if not torch_side.torch_available():
        return {"skipped": "torch is not installed"}, None
    if config.model.backbone not in ("resnet18", "resnet34", "resnet50"):
        return {"skipped": f"no PyTorch version of {config.model.backbone}"}, None
    phases.start("torch", "timing the PyTorch re-statement ...")
    result = torch_side.time_torch_step(
        config, per_device_batch, **run, threads=options.torch_threads
    )
    return None, result


def _run(config, options, steps, repeats, warmup, loss_steps, log) -> dict[str, Any]:
    setup = moco_jax.build(config, STEPS_PER_EPOCH)  # validates the config before anything runs
    num_devices = setup.mesh.size
    batch = config.batch_size
    per_device_batch = batch // num_devices
    device = setup.mesh.devices.flat[0]
    phases = Phases(log)
    run = {"steps": steps, "repeats": repeats, "warmup": warmup}
    report = _header(setup, options, run)

    # PyTorch first: on a GPU it then gets the memory before JAX's step and data take theirs.
    report["torch"], torch_result = _torch_first(config, options, per_device_batch, run, phases)

    # --- Build, compile, analyse. ---
    phases.start("build", f"building {config.model.backbone} on {num_devices} x {device} ...")
    state = setup.initial_state()
    views = SyntheticViews(setup.mesh, config, seed=options.seed)
    phases.start("compile", "compiling ...")
    start = time.perf_counter()
    images_q, images_k = jax.block_until_ready(views(0))  # the first call compiles
    augment_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    traced = setup.algorithm.train_step.trace(state, images_q, images_k)
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
    peak, peak_source = compiled_info.peak_flops(device.device_kind)
    cost = compiled_info.cost_report(step)
    flops = report["flops"] = _flops_report(setup, state, cost, peak, peak_source)

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
    def fixed_views_step(s, views_pair):
        return step(s, *views_pair)

    phases.start("time_step", "timing the step on pre-augmented views ...")
    variants = {}
    state, samples = timed_loop(
        state, fixed_views_step, [(images_q, images_k)], steps, repeats, warmup
    )
    variants["step"] = summarize(samples, batch)
    phases.start("time_step_with_augment", "timing augmentation + step ...")
    per_step = list(range(1, 1 + warmup + steps * repeats))  # global steps, in order

    def augment_and_step(s, global_step):
        return step(s, *views(global_step))

    state, samples = timed_loop(state, augment_and_step, per_step, steps, repeats, warmup)
    variants["step_with_augment"] = summarize(samples, batch)
    capacity = peak * num_devices if peak else None
    for result in variants.values():
        ips = result["images_per_sec"]["median"]
        result["mfu"] = flops["model_flops_per_image"] * ips / capacity if capacity else None
        xla_per_image = flops["xla_flops_per_image"]
        result["xla_flops_utilization"] = (
            xla_per_image * ips / capacity if capacity and xla_per_image else None
        )
    report["variants"] = variants
    report["transfer_guard"] = "disallow"  # the timed loops above ran under it
    report["memory"]["device_peak_bytes_in_use"] = device_peak_bytes()
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
            pair_state = setup.initial_state()

            def time_step() -> float:
                nonlocal pair_state
                pair_state, samples = timed_loop(
                    pair_state, fixed_views_step, [(images_q, images_k)], steps, 3, 1
                )
                return statistics.median(samples)

            floor.update(floor_pairs(traced.jaxpr, device, time_step, options.floor_pairs))
            del pair_state
        report["floor"] = floor

    # --- PyTorch side by side. ---
    if torch_result is not None:
        torch_summary = summarize(torch_result.pop("samples_s"), per_device_batch)
        torch_result.update(torch_summary)
        jax_per_device = variants["step"]["images_per_sec"]["median"] / num_devices
        torch_result["jax_images_per_sec_per_device"] = jax_per_device
        torch_result["jax_over_torch"] = jax_per_device / torch_summary["images_per_sec"]["median"]
        report["torch"] = torch_result

    # --- Mixed precision: a short loss curve in both dtypes. ---
    report["loss_check"] = None
    if loss_steps > 0:
        phases.start("loss_check", f"loss curves, float32 vs bfloat16, {loss_steps} steps ...")
        report["loss_check"] = loss_curves(setup, step, views, loss_steps, options.seed)

    # --- Collectives on an n-device mesh. ---
    report["collectives"] = None
    if options.collectives:
        n = options.collectives_devices
        phases.start("collectives", f"collectives of the step on {n} devices ...")
        if num_devices == n:
            report["collectives"] = collective_report(setup, step.as_text())
        elif jax.device_count() >= n:
            report["collectives"] = collectives_on_mesh(config, n)
        else:
            report["collectives"] = collectives_in_subprocess(config, n)
    phases.stop()
    report["phase_seconds"] = phases.seconds
    return report
