"""A headline figure over seeds: pretrain one config once per seed, optionally run the cached
linear probe on each, and report mean ± std with each seed's figure::

    python -m benchmarks.seeds --config configs/fashion_mnist.py --seeds 3 \\
        --root runs/seeds/fashion_mnist --then linear --markdown seeds.md --json seeds.json

Seed ``s`` pretrains in ``ROOT/seed_s`` with ``--config.seed=s`` (``--set field=value`` adds
overrides to every run), with ``train.py`` as a user would run it; the linear probe
(``--linear_config``, ``linear.cached_features=True``) writes ``ROOT/seed_s/linear_cached``.
Rerunning the same command resumes each run where it stopped (the runs are ``train.py``'s and
``evaluate linear``'s own resumable runs) and skips the finished ones, so hours of CPU can be
spread over several sessions. The std is the sample standard deviation (n - 1), as the official
MoCo README's 5 trials.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURES = [  # (name, the file a run writes, its key)
    ("kNN head", "summary.json", "final_knn_head"),
    ("kNN backbone", "summary.json", "final_knn_backbone"),
    ("linear top-1", "linear_cached/summary.json", "test_top1"),
]


def _finished(workdir: pathlib.Path) -> bool:
    """A pretraining run that reached its config's last epoch (its summary says so)."""
    try:
        summary = json.loads((workdir / "summary.json").read_text())
        epochs = json.loads((workdir / "config.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        return False
    return summary.get("final_epoch") == epochs


def _run(command: list[str], log: pathlib.Path) -> None:
    """One run, its output appended to ``log``; a failure stops here, naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        sys.exit(f"error: {command[1]} exited with {code}; see {log}")


def run_seed(args, seed: int) -> dict[str, float]:
    """Pretrain (and probe) seed ``seed`` unless done; its figures."""
    workdir = pathlib.Path(args.root) / f"seed_{seed}"
    overrides = [f"--config.seed={seed}", *(f"--config.{s}" for s in args.set)]
    t0 = time.time()
    if not _finished(workdir):
        command = [sys.executable, "train.py", "--config", args.config, "--workdir", str(workdir)]
        _run([*command, *overrides], workdir / "seeds.log")
    if args.then == "linear" and not (workdir / "linear_cached" / "summary.json").exists():
        command = [sys.executable, "-m", "moco_jax.evaluate", "linear", "--config",
                   args.linear_config, "--pretrained", str(workdir), "--workdir",
                   str(workdir / "linear_cached"), "--config.linear.cached_features=True",
                   f"--config.seed={seed}"]  # fmt: skip
        _run(command, workdir / "seeds.log")
    figures = {}
    for name, file, key in FIGURES:
        path = workdir / file
        if path.exists():
            figures[name] = json.loads(path.read_text())[key]
    print(f"seed {seed}: {figures} ({time.time() - t0:.0f} s this time)", flush=True)
    return figures


def table(per_seed: dict[int, dict[str, float]]) -> tuple[str, dict]:
    """Markdown rows ``figure | mean ± std | each seed`` and the same as JSON."""
    names = [name for name, _, _ in FIGURES if any(name in f for f in per_seed.values())]
    seeds = sorted(per_seed)
    lines = ["| figure | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]  # fmt: skip
    result = {"seeds": seeds, "figures": {}}
    for name in names:
        values = [per_seed[s][name] for s in seeds if name in per_seed[s]]
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        mean = statistics.fmean(values)
        cells = [f"{per_seed[s][name]:.2f}" if name in per_seed[s] else "-" for s in seeds]
        lines.append(f"| {name} | {mean:.2f} ± {std:.2f} | " + " | ".join(cells) + " |")
        result["figures"][name] = {"mean": mean, "std": std, "values": values}
    return "\n".join(lines), result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="pretraining config (configs/*.py)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--root", required=True, help="one workdir per seed under it")
    parser.add_argument("--then", choices=("linear",), help="then the cached linear probe")
    parser.add_argument("--linear_config", default="configs/linear_fashion_mnist.py")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every run, e.g. epochs=5")  # fmt: skip
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    per_seed = {seed: run_seed(args, seed) for seed in range(args.seeds)}
    markdown, result = table(per_seed)
    print(markdown)
    result.update(config=args.config, overrides=args.set, then=args.then)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(markdown + "\n")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
