"""The step's collectives by MoCo payload (benchmarks); the generic readers of a compiled
function (memory, FLOPs, collectives, peaks) live in ``moco_jax.pod.compiled_stats``."""

from __future__ import annotations

from typing import Any

import numpy as np

from moco_jax.pod.compiled_stats import (  # noqa: F401  (re-exported for the benchmarks)
    PEAK_BF16_FLOPS,
    cost_report,
    memory_report,
    moved_fraction,
    parse_collectives,
    peak_flops,
)


def collective_report(
    hlo_text: str,
    num_devices: int,
    global_batch: int,
    image_shape: tuple[int, int, int],
    dim: int,
) -> dict[str, Any]:
    """Per-step, per-device bytes of every collective, by kind and by payload.

    ``result_bytes`` is the size of what each collective produces on one device;
    ``moved_bytes`` is what one device sends under ring (all-reduce) / pairwise (all-to-all,
    all-gather) algorithms. Payloads are recognised by element count: ``images`` = this device's
    key images (the Shuffle-BN exchange), ``keys`` = its keys (the way back),
    ``keys_all_devices`` = every device's keys (the queue update); the rest (gradients, BN
    statistics, metrics) is ``other``. ``gather_all_images_bytes`` is what the official
    Shuffle-BN's all-gather of every image (float32) would produce on each device.
    """
    per_device = global_batch // num_devices
    pixels = int(np.prod(image_shape))
    payloads = {
        per_device * pixels: "images",
        per_device * dim: "keys",
        global_batch * dim: "keys_all_devices",
    }
    ops = parse_collectives(hlo_text, num_devices)
    by_kind: dict[str, dict[str, float]] = {}
    by_payload: dict[str, dict[str, float]] = {}

    def add(table: dict, key: str, result_bytes: float, fraction: float) -> None:
        entry = table.setdefault(key, {"count": 0, "result_bytes": 0, "moved_bytes": 0.0})
        entry["count"] += 1
        entry["result_bytes"] += int(result_bytes)
        entry["moved_bytes"] += result_bytes * fraction

    for op in ops:
        fraction = moved_fraction(op["kind"], op["group_size"])
        add(by_kind, op["kind"], op["result_bytes"], fraction)
        if op["elements"] in payloads:  # the whole op carries one payload (maybe in chunks)
            pieces = [(payloads[op["elements"]], op["result_bytes"])]
        else:  # a combined op (XLA merges small all-reduces): classify each tuple element
            pieces = [(payloads.get(e, "other"), b) for e, b in op["parts"]]
        merged: dict[str, float] = {}
        for payload, size in pieces:
            merged[payload] = merged.get(payload, 0) + size
        for payload, size in merged.items():
            add(by_payload, f"{op['kind']}:{payload}", size, fraction)
    total_moved = sum(e["moved_bytes"] for e in by_kind.values())
    shuffle = by_payload.get("all-to-all:images", {"result_bytes": 0, "moved_bytes": 0.0})
    gather_result = global_batch * pixels * 4
    gather_moved = gather_result * moved_fraction("all-gather", num_devices)
    return {
        "num_devices": num_devices,
        "global_batch": global_batch,
        "per_device_batch": per_device,
        "by_kind": by_kind,
        "by_payload": by_payload,
        "total_result_bytes": int(sum(op["result_bytes"] for op in ops)),
        "total_moved_bytes": float(total_moved),
        "shuffle_images_all_to_all_bytes": int(shuffle["result_bytes"]),
        "gather_all_images_bytes": int(gather_result),
        "shuffle_over_gather": (shuffle["result_bytes"] / gather_result if gather_result else None),
        "shuffle_images_moved_bytes": float(shuffle["moved_bytes"]),
        "gather_all_images_moved_bytes": float(gather_moved),
        "method": (
            "optimised HLO of the compiled step; per device and step; result_bytes = size of "
            "each collective's result, moved_bytes = bytes sent by one device (ring all-reduce "
            "2(n-1)/n, all-gather/all-to-all (n-1)/n of the result)"
        ),
    }
