"""Compile a whole run for a TPU slice on a machine without one: does it fit, what does it move?

``python train.py --config C --workdir W --compile_for=v5e:16x16 [--compile_report R.json]``
builds the run for that slice's devices and hosts (``compile_targets``), compiles every jitted
function with the real TPU compiler (libtpu, ``requirements-tpu.txt``) and reports, per function
and per chip: argument, output, temporary and generated-code bytes, what else stays allocated
meanwhile (the training state, a resident dataset), their total against the chip's HBM, the
collectives of the compiled HLO with the bytes each sends per call, FLOPs per call, and for the
training step the images/sec/chip a chip would reach *if* it ran the compiler's FLOPs at its peak
(a bound, not a measurement). Nothing runs and no dataset is read. A function that does not fit
is one error line naming it and the shortfall, with the largest per-chip batch whose training
step fits (found by compiling).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import jax
from absl import logging

from moco_jax.config.checks import ConfigError
from moco_jax.config.validation import validate_config
from moco_jax.pod import compiled_stats
from moco_jax.pod.compile_targets import Target, run_targets, step_target, with_batch
from moco_jax.pod.topology import GIB, Topology, topology_devices

MAX_BATCH_DOUBLINGS = 6  # --compile_search_batch tries up to 64x the config's per-chip batch


# The TPU compiler's refusal of a program larger than the chip's HBM, e.g. "RESOURCE_EXHAUSTED:
# Ran out of memory on HBM, the total memory required for HLO temporaries (16.00G) exceeds
# available HBM (15.75G)."
_REFUSED = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory.*?\((\d+(?:\.\d+)?)G\)")


def compile_target(target: Target, topology: Topology) -> dict[str, Any]:
    """Compile ``target`` and read its per-chip memory, FLOPs and collectives; a program the
    compiler refuses for lack of HBM is an entry that does not fit (``compile_error``, and the
    bytes the compiler named as ``bytes_per_chip``)."""
    start = time.perf_counter()
    try:
        compiled = target.fn.lower(*target.args).compile()
    except jax.errors.JaxRuntimeError as err:
        refused = _REFUSED.search(str(err))
        if refused is None:
            raise
        return {
            "name": target.name,
            "compile_seconds": round(time.perf_counter() - start, 1),
            "compile_error": str(err).splitlines()[0],
            "bytes_per_chip": int(float(refused.group(1)) * GIB),
            "hbm_bytes_per_chip": topology.hbm_per_chip,
            "flops_per_chip": None,
            "collectives": {},
            "collective_bytes_sent_per_chip": 0,
            "fits": False,
        }
    seconds = time.perf_counter() - start
    memory = compiled_stats.memory_report(compiled)
    cost = compiled_stats.cost_report(compiled)
    num_devices = len(topology.devices)
    collectives = compiled_stats.collectives_by_kind(compiled.as_text(), num_devices)
    chip = topology.devices_per_chip  # megacore: 1 (a chip's two cores are one device)
    own = memory["peak_bytes_estimate"] + (memory["generated_code_bytes"] or 0)
    alongside = sum(target.alongside.values())
    entry = {
        "name": target.name,
        "compile_seconds": round(seconds, 1),
        **{k: v * chip for k, v in memory.items() if k.endswith("_bytes") and v is not None},
        "alongside_bytes": alongside * chip,
        "alongside": {k: v * chip for k, v in target.alongside.items()},
        "bytes_per_chip": (own + alongside) * chip,
        "hbm_bytes_per_chip": topology.hbm_per_chip,
        "flops_per_chip": cost["flops"] * chip if cost["flops"] is not None else None,
        "collectives": collectives,
        "collective_bytes_sent_per_chip": sum(c["moved_bytes"] for c in collectives.values())
        * chip,
    }
    entry["fits"] = entry["bytes_per_chip"] <= topology.hbm_per_chip
    if max(compiled_stats.executions(compiled.as_text()).values(), default=1) > 1:
        # XLA's cost analysis counts a loop's body once (the kNN functions walk test chunks).
        entry["flops_note"] = "a loop's body counted once (XLA cost analysis): per iteration"
    if target.images_per_call and entry["flops_per_chip"]:
        entry.update(_throughput_bound(target.images_per_call * chip, entry, topology))
    return entry


def _throughput_bound(images: int, entry: dict, topology: Topology) -> dict[str, Any]:
    """Images/sec/chip *if* a chip ran the compiler's FLOPs at its bf16 peak: an upper bound at
    100% MFU by construction (a run at 40% MFU does 0.4x this). Not a measurement."""
    peak, source = compiled_stats.peak_flops(topology.device_kind)
    if peak is None:
        return {}
    return {
        "images_per_call_per_chip": images,
        "peak_flops_per_chip": peak,
        "peak_flops_source": source,
        "bound_seconds_per_call": entry["flops_per_chip"] / peak,
        "bound_images_per_sec_per_chip": images * peak / entry["flops_per_chip"],
        "bound_mfu": 1.0,
    }


def largest_fitting_batch(
    config: Any, topology: Topology, current: int, fits_now: bool
) -> dict[str, Any]:
    """The largest per-chip batch (a power of two times ``current``, or a halving of it) whose
    training step fits, by compiling: halving from ``current`` when it does not fit, doubling
    while it does."""
    devices, tried = topology.devices, {}
    chips = len(devices) // topology.devices_per_chip

    def fits(per_device: int) -> bool | None:
        candidate = with_batch(config, per_device, len(devices))
        try:
            validate_config(candidate, len(devices))
        except ConfigError:
            return None  # e.g. the queue is no longer a multiple of the batch
        entry = compile_target(step_target(candidate, devices), topology)
        tried[per_device * topology.devices_per_chip] = entry["bytes_per_chip"]
        logging.info("per-chip batch %d: %.2f GiB", per_device, entry["bytes_per_chip"] / GIB)
        return entry["fits"]

    best = current if fits_now else None
    size = current
    if fits_now:
        for _ in range(MAX_BATCH_DOUBLINGS):
            if not fits(size * 2):
                break
            size = best = size * 2
    else:
        while size > 1 and best is None:
            size //= 2
            best = size if fits(size) else None
    best_chip = None if best is None else best * topology.devices_per_chip
    return {"largest_per_chip_batch": best_chip, "bytes_per_chip_by_batch": tried, "chips": chips}


def compile_report(config: Any, name: str, search_batch: bool = False) -> dict[str, Any]:
    """Compile every function of ``config``'s run for the slice ``name`` (see module doc)."""
    topology = topology_devices(name)
    setup, targets = run_targets(config, topology.devices)
    entries = []
    for target in targets:
        logging.info("compiling %s for %s", target.name, name)
        entries.append(compile_target(target, topology))
        print(_row(entries[-1]), flush=True)
    report = _report(config, name, topology, setup, entries)
    if search_batch or not entries[0]["fits"]:
        per_device = config.batch_size // setup.mesh.size
        report["training_step_batch"] = largest_fitting_batch(
            config, topology, per_device, entries[0]["fits"]
        )
    return report


def _report(config, name, topology, setup, entries) -> dict[str, Any]:
    per_device = config.batch_size // setup.mesh.size
    return {
        "topology": name,
        "device_kind": topology.device_kind,
        "chips": len(topology.devices) // topology.devices_per_chip,
        "hosts": topology.num_hosts,
        "hbm_bytes_per_chip": topology.hbm_per_chip,
        "global_batch": config.batch_size,
        "per_chip_batch": per_device * topology.devices_per_chip,
        "model": {k: config.model[k] for k in ("backbone", "dtype", "width_multiplier")},
        "functions": entries,
    }


def _collectives(entry: dict) -> str:
    """``all-reduce 1x 93.4`` ...: count and MiB one chip sends, per kind."""
    return ", ".join(
        f"{kind} {c['count']}x {c['moved_bytes'] / 2**20:.1f}"
        for kind, c in sorted(entry["collectives"].items())
    )


def _row(entry: dict) -> str:
    mib = lambda key: f"{entry.get(key, 0) / 2**20:9.1f}"
    sent = entry["collective_bytes_sent_per_chip"] / 2**20
    flops = "-" if entry["flops_per_chip"] is None else f"{entry['flops_per_chip'] / 1e9:.1f}"
    return (
        f"{entry['name'][:44]:44s} {mib('argument_bytes')} {mib('output_bytes')} "
        f"{mib('temp_bytes')} {mib('generated_code_bytes')} {mib('alongside_bytes')} "
        f"{mib('bytes_per_chip')} / {entry['hbm_bytes_per_chip'] / 2**20:.0f} "
        f"{'fits' if entry['fits'] else 'DOES NOT FIT':12s} {flops:>10s} {sent:10.1f}  "
        f"{_collectives(entry)}{entry.get('compile_error', '')}"
    )


HEADER = (
    f"{'function (MiB per chip)':44s} {'args':>9s} {'output':>9s} {'temp':>9s} {'code':>9s} "
    f"{'beside':>9s} {'total':>9s} / HBM {'':12s} {'GFLOP':>10s} {'MiB sent':>10s}  by kind"
)


def main(config: Any, name: str, report_path: str, search_batch: bool = False) -> dict:
    """The CLI: print the table, write the JSON report, then fail if something does not fit."""
    print(f"compiling for {name} (nothing runs; per chip, one call each)\n{HEADER}", flush=True)
    report = compile_report(config, name, search_batch)
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    step = report["functions"][0]
    if "bound_images_per_sec_per_chip" in step:
        print(
            f"training step: at most {step['bound_images_per_sec_per_chip']:.0f} images/sec/chip "
            f"(a bound, not a measurement: the compiler's FLOPs at the chip's peak, MFU 100%)"
        )
    search = report.get("training_step_batch")
    if search:
        best = search["largest_per_chip_batch"]
        print(f"largest per-chip batch whose training step fits: {best}")
    print(f"report: {report_path}")
    for entry in report["functions"]:
        if not entry["fits"]:
            short = (entry["bytes_per_chip"] - entry["hbm_bytes_per_chip"]) / GIB
            hint = ""
            if search:
                best = search["largest_per_chip_batch"]
                hint = (
                    "; no per-chip batch fits the training step"
                    if best is None
                    else f"; the training step fits up to {best} images per chip "
                    f"(--config.batch_size={best * report['chips']})"
                )
            raise ConfigError(
                f"{entry['name']} needs {entry['bytes_per_chip'] / GIB:.2f} GiB per chip on "
                f"{name}, {short:.2f} GiB more than a {report['device_kind']} chip's "
                f"{entry['hbm_bytes_per_chip'] / GIB:.0f} GiB{hint}"
            )
    return report
