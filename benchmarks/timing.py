"""Timing: the timed loop (no host transfers inside), its summary, and the run's phases."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def summarize(samples_s: list[float], batch: int) -> dict[str, Any]:
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


class Phases:
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


def device_peak_bytes() -> int | None:
    """The allocator's peak bytes in use on the first device (None where not reported)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every backend implements it
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
