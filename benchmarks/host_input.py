"""``python -m benchmarks.host_input``: the host half of the input, ours against the official.

Usage (from the repository root)::

    python -m benchmarks.host_input --synthesize /tmp/imagenet_like --count 800
    python -m benchmarks.host_input --folder /tmp/imagenet_like --cores 1 --json host1.json
    python -m benchmarks.host_input --folder /tmp/imagenet_like --cores 2 --baseline main

Two-view images per second (each image read, decoded, cropped twice, resized to 224, batched and
handed over) of moco_jax's streamed input and of the official MoCo input, each on the same N
cores, on the same files, in one run (``host_sides.py`` says exactly what each side does).
moco_jax is timed both ways (``dataset.resize_on``): ``--resize device`` (the default) makes the
device-resize mode "ours" (the host decodes and sends each image's union of windows; the resize
itself then runs on the accelerators and is not in this number) and the host-resize mode
``ours_other_resize``; ``--resize host`` the other way round.
Sides alternate, ``--repeats`` times; the best run of each side counts (the least disturbed by
other load on the machine; every run is in the JSON). ``--baseline REV`` also times moco_jax's
input at git revision REV (its ``moco_jax`` package checked out into a temporary directory), for
before/after figures from one run. ``--breakdown`` adds what each piece of ours costs per image
per core (``host_pieces.py``).

It also prints how many vCPUs per TPU v5e chip the measured rate asks for, to feed a chip at the
compile report's bound for MoCo v2 ResNet-50 in bf16 at 224 px (the images/sec/chip column of
``docs/pod_readiness.md``: the compiler's FLOPs at the chip's peak, an upper bound) and at 40%
of it, against the 28 vCPUs per chip of Google Cloud's v5e VMs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

from absl import flags

from benchmarks import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_READINESS = os.path.join(REPO, "docs", "pod_readiness.md")
BOUND_ROW = ("moco_v2_imagenet", "bfloat16", "v5e:2x4")  # the compile report's v5e row
VCPUS_PER_V5E_CHIP = 28  # 112 per 4-chip VM, 224 per 8-chip VM
FRACTION = 0.4
BOOT = "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); from benchmarks.host_sides \
import run_side; print(json.dumps(run_side(json.loads(sys.argv[2]))))"


def _define(values: flags.FlagValues) -> None:
    string, integer = flags.DEFINE_string, flags.DEFINE_integer
    string("folder", None, "ROOT of ROOT/train/<class>/<image> to read", flag_values=values)
    integer("cores", 1, "cores to pin both sides to", 1, flag_values=values)
    string("json", None, "write the report here", flag_values=values)
    string("synthesize", None, "write ImageNet-like JPEGs under this ROOT, then stop",
           flag_values=values)  # fmt: skip
    integer("count", 800, "images --synthesize writes", 1, flag_values=values)
    integer("batch", 32, "images per batch (both sides)", 1, flag_values=values)
    integer("repeats", 2, "timed runs of each side, alternating", 1, flag_values=values)
    string("baseline", None, "also time moco_jax's input at this git revision",
           flag_values=values)  # fmt: skip
    flags.DEFINE_boolean("breakdown", False, "also time each piece of ours", flag_values=values)
    flags.DEFINE_enum("resize", "device", ["device", "host"], "where ours resizes the views "
                      "(dataset.resize_on); the other is timed too as ours_other_resize",
                      flag_values=values)  # fmt: skip
    flags.DEFINE_float("bound", None, "images/sec/chip to feed (default: the compile report's)",
                       flag_values=values)  # fmt: skip


def parse_args(argv: list[str]) -> flags.FlagValues:
    values = flags.FlagValues()
    _define(values)
    with cli.usage_errors():
        values(["host_input", *argv])
    if not values.synthesize and not values.folder:
        raise cli.UsageError("give --folder ROOT to benchmark (or --synthesize ROOT to write one)")
    return values


def compile_report_bound(path: str = POD_READINESS) -> float:
    """The images/sec/chip bound of ``BOUND_ROW`` in the pod-readiness report's step table."""
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if tuple(cells[:3]) == BOUND_ROW:
                return float(re.sub(r"[^0-9.]", "", cells[-1]))
    raise cli.UsageError(f"no {' / '.join(BOUND_ROW)} row in {path}: give --bound")


def cores_per_chip(per_core: float, per_cpu_sec: float, bound: float) -> dict[str, float]:
    """vCPUs a v5e chip needs at ``per_core`` two-view images/sec per vCPU (wall clock, as
    measured), and at ``per_cpu_sec`` per CPU-second (what a vCPU of its own would give)."""
    return {
        "bound_images_per_sec_per_chip": bound,
        "vcpus_per_chip_at_bound": bound / per_core,
        "vcpus_per_chip_at_40_percent": FRACTION * bound / per_core,
        "vcpus_per_chip_at_bound_by_cpu_time": bound / per_cpu_sec,
        "vcpus_per_chip_at_40_percent_by_cpu_time": FRACTION * bound / per_cpu_sec,
        "vcpus_per_v5e_chip": VCPUS_PER_V5E_CHIP,
    }


def checkout(revision: str, directory: str) -> str:
    """``moco_jax`` of ``revision`` extracted under ``directory`` (nothing else is touched)."""
    archive = subprocess.run(
        ["git", "-C", REPO, "archive", revision, "moco_jax"], capture_output=True, check=False
    )
    if archive.returncode:
        raise cli.UsageError(f"--baseline {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
    return directory


def run_in_process(request: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """``host_sides.run_side(request)`` in a fresh Python, ``paths`` first on its ``sys.path``."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", BOOT, json.dumps(paths), json.dumps(request)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=False,
    )
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the {request['side']} side failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(values: flags.FlagValues, cpus: list[int], log=print) -> dict[str, Any]:
    """Each side ``--repeats`` times, alternating; the best run of each side counts."""
    root = os.path.abspath(values.folder)
    other = "host" if values.resize == "device" else "device"
    sides = {"ours": ([REPO], values.resize), "ours_other_resize": ([REPO], other),
             "official": ([REPO], "")}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        if values.baseline:
            sides = {"baseline": ([checkout(values.baseline, scratch), REPO], "host"), **sides}
        runs: dict[str, list] = {side: [] for side in sides}
        for repeat in range(values.repeats):
            for side, (paths, resize) in sides.items():
                request = {"side": "official" if side == "official" else "ours", "cpus": cpus,
                           "root": root, "batch": values.batch, "resize": resize}  # fmt: skip
                runs[side].append(run_in_process(request, paths))
                run = runs[side][-1]
                log(f"  run {repeat + 1}: {side:17s} {run['images_per_sec']:7.1f} two-view "
                    f"images/s, {run['images_per_cpu_sec']:7.1f} per CPU-second")  # fmt: skip
    best = {side: max(r["images_per_sec"] for r in rs) for side, rs in runs.items()}
    cpu = {side: max(r["images_per_cpu_sec"] for r in rs) for side, rs in runs.items()}
    cores = len(cpus)
    report = {
        "cores": cores,
        "ours": best["ours"],
        "official": best["official"],
        "ratio": best["ours"] / best["official"],
        "ours_per_core": best["ours"] / cores,
        "official_per_core": best["official"] / cores,
        "ours_per_cpu_sec": cpu["ours"],
        "official_per_cpu_sec": cpu["official"],
        "ratio_cpu": cpu["ours"] / cpu["official"],
        "resize": values.resize,
        "ours_other_resize": best["ours_other_resize"],
        "ours_other_resize_per_cpu_sec": cpu["ours_other_resize"],
        "runs": runs,
        "images_per_run": runs["ours"][0]["images"],
        "batch": values.batch,
        "folder": root,
        "load_average": os.getloadavg(),
    }
    if values.baseline:
        report.update(baseline=best["baseline"], baseline_revision=values.baseline)
        report["baseline_ratio"] = best["baseline"] / best["official"]
        report["baseline_per_cpu_sec"] = cpu["baseline"]
        report["baseline_ratio_cpu"] = cpu["baseline"] / cpu["official"]
    return report


def summary(report: dict[str, Any]) -> str:
    cores, chips = report["cores"], report["chips"]
    lines = [f"host input on {cores} core(s), {report['images_per_run']} images timed per run:"]
    names = {"ours": f"ours ({report['resize']} resize)", "ours_other_resize": "ours ("
             f"{'host' if report['resize'] == 'device' else 'device'} resize)"}  # fmt: skip
    for side in ("baseline", "ours", "ours_other_resize", "official"):
        if side in report:
            rate, cpu = report[side], report[f"{side}_per_cpu_sec"]
            lines.append(
                f"  {names.get(side, side):19s} {rate:7.1f} two-view images/s "
                f"({rate / cores:.1f} per core; {cpu:.1f} per CPU-second)"
            )
    lines.append(f"  ratio               {report['ratio']:.2f} (ours / official; by CPU time "
                 f"{report['ratio_cpu']:.2f})")  # fmt: skip
    if "baseline" in report:
        lines.append(f"  baseline / official {report['baseline_ratio']:.2f} (by CPU time "
                     f"{report['baseline_ratio_cpu']:.2f})")  # fmt: skip
    bound = chips["bound_images_per_sec_per_chip"]
    lines.append(
        f"a v5e chip at the compile report's bound ({bound:.0f} images/s, MoCo v2 R-50 bf16 "
        f"224 px) needs {chips['vcpus_per_chip_at_bound']:.0f} vCPUs at this rate, "
        f"{chips['vcpus_per_chip_at_40_percent']:.0f} at 40% of it (by CPU time: "
        f"{chips['vcpus_per_chip_at_bound_by_cpu_time']:.0f} and "
        f"{chips['vcpus_per_chip_at_40_percent_by_cpu_time']:.0f}); a v5e VM has "
        f"{VCPUS_PER_V5E_CHIP} per chip"
    )
    return "\n".join(lines)


def pieces_table(breakdown: dict[str, Any]) -> str:
    lines = [
        f"ours, CPU ms per image on {breakdown['cores']} core(s), {breakdown['resize']} resize:"
    ]
    for piece, ms in breakdown["ms_per_image"].items():
        lines.append(f"  {piece:9s} {ms:6.2f}")
    lines.append(f"  {'total':9s} {breakdown['total_ms']:6.2f}")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    values = parse_args(argv)
    if values.synthesize:
        from benchmarks.host_images import synthesize

        print(json.dumps(synthesize(values.synthesize, values.count)))
        return 0
    allowed = sorted(os.sched_getaffinity(0))
    if values.cores > len(allowed):
        raise cli.UsageError(f"--cores {values.cores}: this process may use {len(allowed)}")
    bound = values.bound or compile_report_bound()
    report = measure(values, allowed[: values.cores])
    report["chips"] = cores_per_chip(report["ours_per_core"], report["ours_per_cpu_sec"], bound)
    if values.breakdown:
        request = {"side": "pieces", "cpus": allowed[: values.cores], "resize": values.resize,
                   "root": os.path.abspath(values.folder), "batch": values.batch}  # fmt: skip
        report["breakdown"] = {**run_in_process(request, [REPO]), "resize": values.resize}
    print(summary(report))
    if values.breakdown:
        print(pieces_table(report["breakdown"]))
    if values.json:
        cli.write_json(values.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(_main, argv, RuntimeError)


if __name__ == "__main__":
    sys.exit(main())
