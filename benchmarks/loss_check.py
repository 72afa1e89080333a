"""Mixed precision: a short loss curve in float32 and in bfloat16 from the same start and data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

import moco_jax
from benchmarks.inputs import SyntheticViews
from benchmarks.presets import STEPS_PER_EPOCH


def loss_curves(
    setup: moco_jax.Setup,
    main_step: Callable,
    views: SyntheticViews,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Loss per step of a short run in float32 and bfloat16 from the same start and data.

    ``main_step`` is ``setup``'s step (already compiled); the other dtype's step is built on the
    same mesh. All runs start from ``setup.initial_state()`` (parameters are float32 in both
    dtypes). The noise reference is a float32 run on other data (another seed of the synthetic
    indices and augmentation keys). ``within_noise``: over the second half of the run, the largest
    |bf16 - fp32| loss difference is no larger than the largest |fp32 data a - fp32 data b|.
    """
    config = setup.config

    def run(step_fn, run_seed):
        state = setup.initial_state()
        run_views = views if run_seed == seed else SyntheticViews(setup.mesh, config, run_seed)
        losses = []
        for step in range(steps):
            state, metrics = step_fn(state, *run_views(step))
            losses.append(metrics["loss"])
        return [float(x) for x in jax.device_get(losses)]

    other = config.copy_and_resolve_references()
    other.model.dtype = "bfloat16" if config.model.dtype == "float32" else "float32"
    other_setup = moco_jax.build(other, STEPS_PER_EPOCH, mesh=setup.mesh)
    steps_by_dtype = {
        config.model.dtype: main_step,
        other.model.dtype: other_setup.algorithm.train_step,
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
