"""What a compiled function says about itself: memory, FLOPs, collectives; and the chips' peaks.

Read from ``jax.jit(f).lower(...).compile()``, for attached devices or a TPU topology's
compile-only ones (``moco_jax.pod.compile_for``); nothing runs.

- Memory (``Compiled.memory_analysis()``): XLA's buffer assignment for one call on one device.
  ``peak_bytes_estimate = argument + output - alias + temp``: inputs and outputs live at once
  except where an output reuses a donated input's buffer (``alias``), plus the scratch (``temp``)
  XLA allocates for intermediates. It excludes the executable's code (``generated_code_bytes``)
  and whatever else the process holds (the resident dataset, other jitted functions).
- FLOPs (``Compiled.cost_analysis()``): XLA's count for the per-device program (every op,
  including elementwise ones, and convolutions as XLA lowers them).
- Collectives: parsed from the optimised HLO text; sizes come from the result shapes of each
  ``all-to-all`` / ``all-gather`` / ``all-reduce`` / ``reduce-scatter`` / ``collective-permute``
  (async ``-done`` halves count, ``-start`` halves do not, so nothing counts twice).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

COLLECTIVES = (
    "all-to-all",
    "ragged-all-to-all",
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
    "collective-broadcast",
)

# Bytes per element of HLO primitive types (f8 variants are matched by prefix).
_HLO_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}

# Dense bf16 peak FLOP/s per JAX device, matched against ``device.device_kind`` in this order
# (first match wins). Sources: NVIDIA data sheets give "with sparsity" numbers, halved here for
# dense math; Google Cloud TPU system-architecture pages give per-chip peaks (one JAX device per
# chip from v4 on).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12, "NVIDIA H100 data sheet: BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    ("H100 NVL", 835e12, "NVIDIA H100 data sheet: BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    ("H100", 989e12, "NVIDIA H100 data sheet (SXM): BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("H200 NVL", 835e12, "NVIDIA H200 data sheet (NVL): BF16 1,671 TFLOPS with sparsity"),
    ("H200", 989e12, "NVIDIA H200 data sheet (SXM): BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("A100", 312e12, "NVIDIA A100 data sheet: BF16 Tensor Core 312 TFLOPS (dense)"),
    ("TPU v4", 275e12, "cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16 per chip"),
    ("TPU v5 lite", 197e12, "cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16 per chip"),
    ("TPU v5e", 197e12, "cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16 per chip"),
    ("TPU v5p", 459e12, "cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16 per chip"),
    ("TPU v5", 459e12, "cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16 per chip"),
    ("TPU v6 lite", 918e12, "cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16 per chip"),
    ("TPU v6e", 918e12, "cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16 per chip"),
)


def peak_flops(device_kind: str) -> tuple[float | None, str | None]:
    """``(dense bf16 FLOP/s, source)`` of one device of this kind; ``(None, None)`` if unknown."""
    for pattern, flops, source in PEAK_BF16_FLOPS:
        if pattern.lower() in device_kind.lower():
            return flops, source
    return None, None


def memory_report(compiled: Any) -> dict[str, Any]:
    """Per-device buffer sizes of one call, and the peak estimate (see the module docstring)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        stats = None
    if isinstance(stats, (list, tuple)):
        stats = stats[0] if stats else None
    fields = {
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "temp_bytes": "temp_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
    }
    report: dict[str, Any] = {
        key: (int(getattr(stats, attr)) if stats is not None and hasattr(stats, attr) else None)
        for key, attr in fields.items()
    }
    parts = [report[k] for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")]
    report["peak_bytes_estimate"] = (
        None if None in parts else parts[0] + parts[1] - parts[2] + parts[3]
    )
    report["peak_bytes_method"] = (
        "compiled.memory_analysis(): argument + output - alias (donated) + temp, per device"
    )
    return report


def cost_report(compiled: Any) -> dict[str, float | None]:
    """XLA's FLOPs and bytes accessed for one call of the per-device program."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        cost = None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    cost = cost or {}
    flops = cost.get("flops")
    accessed = cost.get("bytes accessed")
    return {
        "flops": float(flops) if flops is not None else None,
        "bytes_accessed": float(accessed) if accessed is not None else None,
    }


# --- Collectives from HLO text. ---

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+(?P<op>[a-z][a-z0-9\-]*)"
    r"\((?P<rest>.*)$"
)
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_OPERAND = re.compile(r"%([\w.\-]+)")


def _element_bytes(dtype: str) -> float | None:
    if dtype in _HLO_BYTES:
        return _HLO_BYTES[dtype]
    if dtype.startswith("f8"):
        return 1
    return None


def _shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    shapes = []
    for dtype, dims in _SHAPE.findall(type_text):
        if _element_bytes(dtype) is None:
            continue  # token[], opaque types
        shapes.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return shapes


def _group_size(rest: str, default: int) -> int:
    match = _GROUPS_IOTA.search(rest)
    if match:
        return int(match.group(2))
    match = _GROUPS_LIST.search(rest)
    if match and match.group(1):
        return len(match.group(1).split(","))
    return default


def moved_fraction(kind: str, n: int) -> float:
    """Bytes one device sends per byte of the op's result, for ring/pairwise algorithms."""
    if n <= 1:
        return 0.0
    return {
        "all-to-all": (n - 1) / n,  # keeps its own chunk
        "ragged-all-to-all": (n - 1) / n,
        "all-gather": (n - 1) / n,  # receives n-1 chunks of the result
        "all-reduce": 2 * (n - 1) / n,  # ring: reduce-scatter then all-gather
        "reduce-scatter": float(n - 1),  # operand is n results; sends all but one
        "collective-permute": 1.0,
        "collective-broadcast": 1.0,
    }[kind]


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)")
_WHILE_BODY = re.compile(r"\bwhile\(.*\bcondition=%?([\w.\-]+).*\bbody=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")


def executions(hlo_text: str) -> dict[str, int]:
    """How many times each computation of an HLO module runs per call: the entry once, a while
    loop's body ``trip count`` times its caller (the count XLA records, else the bound of the
    loop condition's ``i < N``, counting from 0, as ``lax.map``/``fori_loop`` lower), any other
    called computation as often as its caller."""
    lines_of: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
            lines_of[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None:
            lines_of[current].append(line)
    runs = {entry: 1} if entry else {}
    pending = [entry] if entry else []
    while pending:
        name = pending.pop()
        for line in lines_of.get(name, []):
            loop = _WHILE_BODY.search(line)
            trip = 1
            if loop:
                known = _TRIP.search(line)
                bounds = [
                    int(c) for c in _CONSTANT.findall("\n".join(lines_of.get(loop.group(1), [])))
                ]
                trip = int(known.group(1)) if known else (max(bounds) if bounds else 1)
            for field, called in _CALLED.findall(line):
                count = runs[name] * (trip if field == "body" else 1)
                if called in lines_of and runs.get(called, 0) < count:
                    runs[called] = count
                    pending.append(called)
    return runs


def parse_collectives(hlo_text: str, num_devices: int) -> list[dict[str, Any]]:
    """Every collective instruction of an HLO module: kind, result shapes and bytes, group size,
    and how many times it runs per call (``executions``: inside a loop, once per iteration)."""
    found = []
    start_groups: dict[str, int] = {}  # async ``-start`` name -> its group size
    runs, current = executions(hlo_text), None
    for line in hlo_text.splitlines():
        computation = _COMPUTATION.match(line)
        if computation:
            current = computation.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        op, rest = match.group("op"), match.group("rest")
        if op.endswith("-start") and op[: -len("-start")] in COLLECTIVES:
            start_groups[match.group("name")] = _group_size(rest, num_devices)
            continue
        kind = op[: -len("-done")] if op.endswith("-done") else op
        if kind not in COLLECTIVES:
            continue
        group = _group_size(rest, num_devices)
        if op.endswith("-done"):  # the groups are written on the matching -start
            operand = _OPERAND.search(rest)
            group = start_groups.get(operand.group(1), group) if operand else group
        shapes = _shapes(match.group("type"))
        parts = [
            (int(np.prod(dims, dtype=np.int64)), _element_bytes(dtype) * int(np.prod(dims)))
            for dtype, dims in shapes
        ]
        found.append(
            {
                "kind": kind,
                "shapes": [f"{dtype}{list(dims)}" for dtype, dims in shapes],
                "parts": parts,  # (elements, bytes) of each tuple element of the result
                "elements": sum(e for e, _ in parts),
                "result_bytes": int(sum(b for _, b in parts)),
                "group_size": group,
                "executions": runs.get(current, 1),
            }
        )
    return found


def collectives_by_kind(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
    """Per collective kind: ``count`` (instructions run per call, loop iterations included),
    ``result_bytes`` (what they produce on one device) and ``moved_bytes`` (what one device
    sends, see ``moved_fraction``) for one call."""
    by_kind: dict[str, dict[str, float]] = {}
    for op in parse_collectives(hlo_text, num_devices):
        entry = by_kind.setdefault(op["kind"], {"count": 0, "result_bytes": 0, "moved_bytes": 0.0})
        runs, size = op["executions"], op["result_bytes"]
        entry["count"] += runs
        entry["result_bytes"] += runs * size
        entry["moved_bytes"] += runs * size * moved_fraction(op["kind"], op["group_size"])
    return by_kind
