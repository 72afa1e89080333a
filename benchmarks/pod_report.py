"""A Markdown section from ``train.py --compile_for`` JSON reports (docs/pod_readiness.md).

``python -m benchmarks.pod_report DIR`` reads every ``<config>_<dtype>_<topology>.json`` in DIR
and prints: per config and dtype, each function's bytes per chip on each slice; the training
step's figures per slice; and how the kNN accuracy functions' bytes and the step's collective
bytes change from 8 chips (v5e:2x4) to 16 and 256 chips. Every figure is the compiler's, per
chip, for one call; nothing ran on a TPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

GIB, MIB = 2**30, 2**20
KINDS = ("all-reduce", "all-to-all", "all-gather")
BASE = "v5e:2x4"  # the scaling table's 8-chip reference
SCALED = ("v5e:4x4", "v5e:16x16")


def load(directory: str) -> list[dict[str, Any]]:
    """The reports in ``directory``, each with ``config`` (from its file name) and ``dtype``."""
    reports = []
    for path in sorted(pathlib.Path(directory).glob("*.json")):
        report = json.loads(path.read_text())
        if "functions" not in report:  # not a --compile_for report
            continue
        report["config"] = path.stem.rsplit("_", 2)[0]
        report["dtype"] = report["model"]["dtype"]
        reports.append(report)
    return sorted(reports, key=lambda r: (r["config"], r["dtype"], r["chips"], r["topology"]))


def groups(reports: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """``{(config, dtype): {topology: report}}``, slices by chip count."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for r in reports:
        out.setdefault((r["config"], r["dtype"]), {})[r["topology"]] = r
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def by_name(report: dict) -> dict[str, dict]:
    return {f["name"]: f for f in report["functions"]}


def memory_tables(reports: list[dict]) -> list[str]:
    """(1) One table per config/dtype: GiB per chip of each function on each slice."""
    lines = []
    for (config, dtype), slices in groups(reports).items():
        names = [f["name"] for f in next(iter(slices.values()))["functions"]]
        header = ["function (GiB per chip)"] + [
            f"{t} ({r['chips']} chips, {r['hbm_bytes_per_chip'] // GIB} GiB HBM)"
            for t, r in slices.items()
        ]
        rows = []
        for name in names:
            cells = []
            for r in slices.values():
                f = by_name(r).get(name)
                cells.append(
                    "-" if f is None else gib(f["bytes_per_chip"]) + ("" if f["fits"] else " ✗")
                )
            rows.append([name, *cells])
        lines += [f"#### {config}, {dtype}", "", *table(header, rows), ""]
    return lines


def largest_batch(report: dict) -> str:
    search = report.get("training_step_batch")
    if not search:
        return "-"
    tried = sorted((int(b), n) for b, n in search["bytes_per_chip_by_batch"].items())
    sizes = ", ".join(f"{b}: {gib(n)}" for b, n in tried)
    return f"{search['largest_per_chip_batch']} ({sizes} GiB)"


def mib_sent(step: dict, kind: str) -> str:
    c = step["collectives"].get(kind)
    return "0" if c is None else f"{c['moved_bytes'] / MIB:.1f}"


def step_table(reports: list[dict]) -> list[str]:
    """(2) The training step on each slice."""
    others = sorted(
        {k for r in reports for k in by_name(r)["train_step"]["collectives"]} - set(KINDS)
    )
    header = [
        "config",
        "dtype",
        "slice",
        "chips",
        "hosts",
        "global batch",
        "args GiB",
        "temp GiB",
        "total GiB / HBM",
        "largest per-chip batch (GiB per chip by batch)",
        *[f"{k} MiB" for k in (*KINDS, *others)],
        "GFLOP",
        "images/sec/chip bound",
    ]
    rows = []
    for r in reports:
        s = by_name(r)["train_step"]
        bound = s.get("bound_images_per_sec_per_chip")
        refused = "compile_error" in s  # the compiler's out-of-memory: its total, nothing else
        rows.append(
            [
                r["config"],
                r["dtype"],
                r["topology"],
                str(r["chips"]),
                str(r["hosts"]),
                str(r["global_batch"]),
                "-" if refused else gib(s["argument_bytes"]),
                "-" if refused else gib(s["temp_bytes"]),
                f"{gib(s['bytes_per_chip'])} / {s['hbm_bytes_per_chip'] // GIB}"
                + ("" if s["fits"] else " ✗"),
                largest_batch(r),
                *["-" if refused else mib_sent(s, k) for k in (*KINDS, *others)],
                "-" if refused else f"{s['flops_per_chip'] / 1e9:.0f}",
                "-" if bound is None else f"≤ {bound:.0f}",
            ]
        )
    return table(header, rows)


def scaling_table(reports: list[dict]) -> list[str]:
    """(3) Per-chip bytes and collective bytes of the kNN accuracy functions and the step's
    collective bytes on 16 and 256 chips, as a fraction of their 8-chip value (1/n: 0.5, 0.031)."""
    lines = []
    for (config, dtype), slices in groups(reports).items():
        present = [t for t in SCALED if t in slices]
        if BASE not in slices or not present:
            continue
        base = by_name(slices[BASE])
        sent = ("collective bytes sent", "collective_bytes_sent_per_chip")
        metrics = [
            (f"{n}: {label}", n, key)
            for n in base
            if n.startswith("knn accuracy")
            for label, key in (("total", "bytes_per_chip"), ("without alongside", None), sent)
        ] + [(f"train_step: {sent[0]}", "train_step", sent[1])]
        header = ["MiB per chip", f"{BASE} (8)"] + [
            f"{t} ({slices[t]['chips']}) [x of 8-chip; 1/n: {8 / slices[t]['chips']:.3f}]"
            for t in present
        ]
        rows = []
        for label, name, key in metrics:
            ref, *values = (_value(by_name(slices[t]).get(name), key) for t in (BASE, *present))
            cells = ["-" if ref is None else f"{ref / MIB:.1f}"] + [
                "-" if v is None else f"{v / MIB:.1f} [{v / ref:.3f}]" if ref else f"{v / MIB:.1f}"
                for v in values
            ]
            rows.append([label, *cells])
        lines += [f"#### {config}, {dtype}", "", *table(header, rows), ""]
    return lines


def _value(f: dict | None, key: str | None) -> float | None:
    """``f[key]``, or (None) the function's own bytes: the total less what is held beside it;
    None for a function the compiler refused (or that is missing): its figures are not known."""
    if f is None or "compile_error" in f:
        return None
    return f[key] if key else f["bytes_per_chip"] - f["alongside_bytes"]


def render(reports: list[dict]) -> str:
    lines = ["### Bytes per chip of each function", "", "✗: does not fit the chip's HBM.", ""]
    lines += memory_tables(reports)
    lines += ["### The training step", ""] + step_table(reports) + [""]
    lines += [
        "The images/sec/chip figure is an upper bound, not a measurement: the per-chip batch "
        "divided by the time the compiler's FLOPs would take at the chip's dense bf16 peak "
        "(100% MFU).",
        "",
    ]
    scaling = scaling_table(reports)
    if scaling:
        lines += [f"### From 8 chips ({BASE}) to 16 and 256", "", *scaling]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="folder of <config>_<dtype>_<topology>.json reports")
    print(render(load(parser.parse_args().directory)), end="")


if __name__ == "__main__":
    main()
