"""What a run does before its first step, one line a phase, so a long start-up never looks hung.

A run on a large dataset can spend minutes before the first step: preparing and listing the data,
the kNN baselines (a pass over the training and test splits each), compiling the step. Each
phase says what it is about to do when it starts (``phase``), or why it does not run (``skip``);
``summary`` is one line with the seconds each took. Only process 0 prints. Used by pretraining
(``trainer``); any other entry point can open its own phases the same way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from moco_jax.data.tfds_source import RESIDENT_DATASETS

PREFIX = "start-up"
# knn.baselines "auto": a streamed training split of more images than this skips the baselines
# (ImageNet's 1.28M: two extra passes over it; docs/evaluation.md, baselines before training).
AUTO_BASELINES_MAX_TRAIN = 200_000


class Startup:
    """The start-up phases of one run: their lines, and the seconds each took."""

    def __init__(self, enabled: bool = True, echo: Callable[[str], None] | None = None):
        self.enabled = enabled
        self.echo = echo or (lambda line: print(line, flush=True))
        self.seconds: dict[str, float] = {}

    def say(self, name: str, what: str) -> None:
        if self.enabled:
            self.echo(f"{PREFIX}: {name}: {what}")

    @contextlib.contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        """Say ``what`` phase ``name`` does, run it, keep its duration."""
        self.say(name, what)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start

    def skip(self, name: str, why: str) -> None:
        self.say(name, f"skipped ({why})")

    def summary(self) -> str:
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"{PREFIX}: done in {sum(self.seconds.values()):.1f} s ({parts})"

    def done(self) -> None:
        """The summary line, once the last phase has ended."""
        if self.enabled:
            self.echo(self.summary())


def data_line(config: Any) -> str:
    """What the data phase does for ``config``."""
    dataset = config.dataset
    where = "kept on the devices" if dataset.name in RESIDENT_DATASETS else "streamed"
    return (
        f"{dataset.name} ({where}): prepare or find the dataset, load this process's share, "
        f"build the model, restore the newest checkpoint if any"
    )


def baselines_wanted(config: Any, train_images: int) -> tuple[bool, str]:
    """Whether to compute the kNN baselines before training (``knn.baselines``), and why."""
    setting = config.knn.baselines
    resident = config.dataset.name in RESIDENT_DATASETS
    if setting == "on":
        return True, "knn.baselines 'on'"
    if setting == "off":
        return False, "knn.baselines 'off'"
    if resident or train_images <= AUTO_BASELINES_MAX_TRAIN:
        return True, f"knn.baselines 'auto': {train_images} training images"
    return False, (
        f"knn.baselines 'auto': {train_images} streamed training images, over "
        f"{AUTO_BASELINES_MAX_TRAIN}; --config.knn.baselines=on computes them (two passes over "
        f"the training and test splits), or later: python -m moco_jax.evaluate knn"
    )
