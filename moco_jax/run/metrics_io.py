"""Metrics on disk: JSON lines, TensorBoard event files and the PNG plot of a run.

TensorBoard is clu's ``metric_writers.SummaryWriter``. The JSON lines stay ours: clu has no
JSON-lines writer, and a resumed run rewinds them to its checkpoint's step and rebuilds them from
the history the checkpoint keeps (``MetricsWriter.resume``), which no clu writer does.
"""

from __future__ import annotations

import io
import json

from absl import logging
from etils import epath

# Whole or not at all, and never over a device, FIFO or socket (also imported from here).
from moco_jax.storage import read_bytes, read_text
from moco_jax.storage import write_whole as write_atomically


class MetricsWriter:
    """Writes step metrics, epoch records and baselines under the workdir (process 0 only)."""

    def __init__(self, workdir: epath.Path, enabled: bool = True):
        self.workdir, self.enabled = workdir, enabled
        self._tensorboard = None
        if enabled:
            from clu import metric_writers  # TensorFlow's summary writer, already needed by TFDS

            self._tensorboard = metric_writers.SummaryWriter(str(workdir / "tensorboard"))

    def _append(self, name: str, record: dict) -> None:
        if self.enabled:
            with (self.workdir / name).open("a") as f:
                f.write(json.dumps(record) + "\n")

    def write_step(self, step: int, scalars: dict[str, float]) -> None:
        self._append("metrics.jsonl", {"step": step, **scalars})
        self._scalars(step, "train", scalars)

    def write_epoch(self, record: dict) -> None:
        self._append("epochs.jsonl", record)
        self._scalars(record["epoch"], "epoch", {k: v for k, v in record.items() if k != "epoch"})
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def _scalars(self, step: int, prefix: str, scalars: dict[str, float]) -> None:
        if self._tensorboard is not None:
            self._tensorboard.write_scalars(step, {f"{prefix}/{k}": v for k, v in scalars.items()})

    def write_baselines(self, baselines: dict[str, float]) -> None:
        if self.enabled:
            write_atomically(self.workdir / "baselines.json", baselines_text(baselines))

    def resume(self, step: int, steps_per_epoch: int, saved: dict | None) -> dict:
        """The history (baselines, epoch records) a run resumed at ``step`` continues, with the
        files rewound to it: records written after ``step`` are forgotten (the run redoes them).

        ``saved``: the history the checkpoint of ``step`` keeps. The files are rebuilt from it, so
        a record or a baselines file a killed run damaged comes back as it was (its kNN figures
        cannot be measured again). None (a fresh run, or a checkpoint of an earlier version that
        kept none): the files are the only source; a damaged record is dropped with a warning,
        and damaged baselines are computed again.
        """
        self._rewind("metrics.jsonl", "step", step)
        if saved is None:
            self._rewind("epochs.jsonl", "epoch", step // steps_per_epoch)
            return self.read_history()
        history = {"epochs": list(saved.get("epochs", []))}
        texts = {"epochs.jsonl": "".join(json.dumps(r) + "\n" for r in history["epochs"])}
        if "baselines" in saved:
            history["baselines"] = dict(saved["baselines"])
            texts["baselines.json"] = baselines_text(history["baselines"])
        for name, text in texts.items():
            self._rebuild(name, text, step)
        return history

    def _rewind(self, name: str, key: str, last: int) -> None:
        """Forget the records of ``name`` after ``last`` and any line a killed run left cut."""
        path = self.workdir / name
        if self.enabled and path.exists():
            lines = read_text(path).splitlines()
            kept = [json.dumps(r) for r in read_records(path, key) if r[key] <= last]
            if kept != lines:
                write_atomically(path, "".join(line + "\n" for line in kept))

    def _rebuild(self, name: str, text: str, step: int) -> None:
        """Make ``name`` hold ``text``, what the checkpoint of ``step`` keeps; warn when that
        brings back something lost (not only when it forgets records written after ``step``)."""
        if not self.enabled:
            return
        path = self.workdir / name
        current = read_bytes(path) if path.exists() else b""
        if current == text.encode():
            return
        if not current.startswith(text.encode()):
            logging.warning(
                "%s was missing or damaged: rewritten from checkpoint step %d", path, step
            )
        write_atomically(path, text)

    def read_history(self) -> dict:
        """Baselines and epoch records written so far (a resumed run continues them); a file a
        killed run left damaged is dropped with a warning (the baselines are then recomputed)."""
        history: dict = {}
        baselines = self.workdir / "baselines.json"
        if baselines.exists():
            try:
                history["baselines"] = dict(json.loads(read_text(baselines)))
            except ValueError:
                logging.warning("%s is damaged; the baselines are computed again", baselines)
        epochs = self.workdir / "epochs.jsonl"
        if epochs.exists():
            history["epochs"] = read_records(epochs, "epoch")
        return history


def baselines_text(baselines: dict[str, float]) -> str:
    return json.dumps(baselines, indent=2) + "\n"


def read_records(path: epath.Path, key: str) -> list[dict]:
    """The JSON-lines records of ``path`` that have ``key``; others are dropped with a warning."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and key in record:
            records.append(record)
        elif line.strip():
            logging.warning("%s line %d is damaged (a killed run?): dropped", path, number)
    return records


KNN_CURVES = [("knn_head", "head (output)"), ("knn_backbone", "backbone (pooled)")]


def plot_history(
    history: dict,
    path: epath.Path,
    title: str,
    curves: list[tuple[str, str]] = KNN_CURVES,
    accuracy: str = "kNN (k=200, t=0.1)",
) -> None:
    """Loss and accuracy (``curves``: record key, label) per epoch, with the raw-pixel and
    random-init baselines when the history has them."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history.get("epochs", [])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["epoch"] for r in epochs], [r["loss"] for r in epochs], "o-")
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", title=f"{title}: loss")
    for key, label in curves:
        evaluated = [r for r in epochs if key in r]
        ax_acc.plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated], "o-", label=label)
    baselines = history.get("baselines", {})
    styles = [
        ("knn_pixels", "raw pixels", "k:"),
        ("random_init_knn_head", "random init", "r:"),
        ("init_from_knn_head", "init_from weights", "g:"),
    ]
    for key, label, style in styles:
        if key in baselines:
            ax_acc.axhline(baselines[key], linestyle=style[1:], color=style[0], label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: {accuracy}")
    ax_acc.legend(loc="lower right")
    last_epoch = max((r["epoch"] for r in epochs), default=1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    write_atomically(path, png.getvalue())
