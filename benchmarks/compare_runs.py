"""Runs side by side: kNN top-1 per epoch of several pretraining workdirs, as a table and a plot.

    python -m benchmarks.compare_runs --out docs/fashion_mnist_v3.png \\
        "v3 vit_mini=runs/v3_vit" "v2 vit_mini=runs/v2_vit" ...

Each argument is ``LABEL=WORKDIR``; the workdir's ``epochs.jsonl`` and ``baselines.json`` are
read (a run still training shows the epochs it has). Prints a Markdown table (epoch rows, one
column per run, ``head / backbone``) and writes the plot of the head's kNN top-1 per epoch, the
random-init baselines at epoch 0 and the raw-pixel kNN as a line.
"""

from __future__ import annotations

import argparse
import json
import pathlib


def read_run(workdir: str) -> tuple[list[dict], dict]:
    """(epoch records, baselines) of a pretraining workdir."""
    path = pathlib.Path(workdir)
    records = [json.loads(line) for line in (path / "epochs.jsonl").read_text().splitlines()]
    baselines_file = path / "baselines.json"
    baselines = json.loads(baselines_file.read_text()) if baselines_file.exists() else {}
    return records, baselines


def markdown_table(runs: dict[str, tuple[list[dict], dict]]) -> str:
    """Epoch 0 (random init) and every epoch's kNN top-1, ``head / backbone`` per run."""
    labels = list(runs)
    lines = ["| epoch | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    last = max(len(records) for records, _ in runs.values())
    for epoch in range(last + 1):
        cells = []
        for records, baselines in runs.values():
            if epoch == 0:
                row = {k[len("random_init_") :]: v for k, v in baselines.items()}
            else:
                row = records[epoch - 1] if epoch <= len(records) else {}
            head, backbone = row.get("knn_head"), row.get("knn_backbone")
            cells.append(f"{head:.2f} / {backbone:.2f}" if head is not None else "")
        name = "0 (random init)" if epoch == 0 else str(epoch)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, tuple[list[dict], dict]], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pixels = None
    for label, (records, baselines) in runs.items():
        epochs = [0] + [r["epoch"] for r in records]
        knn = [baselines.get("random_init_knn_head")] + [r["knn_head"] for r in records]
        ax.plot(epochs, knn, marker="o", label=label)
        pixels = baselines.get("knn_pixels", pixels)
    if pixels is not None:
        ax.axhline(pixels, color="gray", linestyle="--", label=f"raw pixels ({pixels:.2f})")
    ax.set_xlabel("epoch (0: random init)")
    ax.set_ylabel("kNN top-1 (%), head features")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR")
    parser.add_argument("--out", help="the plot's path (PNG)")
    parser.add_argument("--title", default="Fashion-MNIST, kNN top-1 per epoch")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, workdir = spec.partition("=")
        if not sep:
            parser.error(f"{spec!r} is not LABEL=WORKDIR")
        runs[label] = read_run(workdir)
    print(markdown_table(runs))
    if args.out:
        plot(runs, args.out, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
