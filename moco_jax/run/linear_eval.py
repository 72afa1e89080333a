"""The linear-evaluation run: ``python -m moco_jax.evaluate linear --config C --pretrained P
--workdir W``.

The same engine as pretraining (``trainer.train_loop``: checkpoints, exact resume, SIGTERM, the
progress bar, JSON lines, TensorBoard), with the ``linear`` algorithm's step, one labelled view per
image, and the classifier's test top-1/top-5 (``evaluation.classifier``) as the epoch's
evaluation. After the run, as the official ``main_lincls.py`` does, the backbone is checked to be
bit-for-bit the pretrained one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from moco_jax import storage
from moco_jax.config.checks import ConfigError
from moco_jax.evaluation.classifier import ClassifierMonitor
from moco_jax.interop import architecture, formats
from moco_jax.interop.errors import WeightBridgeError
from moco_jax.run.cached_features import cached_views
from moco_jax.run.metrics_io import plot_history, write_atomically
from moco_jax.run.run_setup import Run, setup_run
from moco_jax.run.saved_run import load_run_config
from moco_jax.run.trainer import train_loop
from moco_jax.storage import absolute, canonical, check_reachable, is_within

# Architecture fields a pretraining workdir's config.json (or a torch file) decides for the run.
ARCHITECTURE_FIELDS = ("backbone", "width_multiplier", "cifar_stem")
TEST_CURVES = [("test_top1", "test top-1"), ("test_top5", "test top-5")]


def with_pretrained(config: Any, pretrained: str | None = None) -> Any:
    """``config`` with ``linear.pretrained`` (from ``pretrained`` if given) as its ``init_from``,
    and the backbone architecture (logged) of a pretraining workdir's run or of a PyTorch file."""
    config = config.copy_and_resolve_references()
    if pretrained is not None:
        config.linear.pretrained = pretrained
    # Absolute: the saved config names the same place whatever directory a resumed run is in.
    config.init_from = source = config.linear.pretrained = absolute(config.linear.pretrained)
    if source is None:
        logging.warning("linear.pretrained is not set: evaluating the random-init encoder")
        return config
    check_reachable("linear.pretrained", source)
    path = epath.Path(source)
    if not path.exists():
        raise ConfigError(f"linear.pretrained: {source} does not exist")
    storage.check_input(path, "linear.pretrained")  # before its kind decides what is read
    saved = _workdir_config(path) if path.is_dir() else None  # a file in a workdir: its own
    if saved is not None:
        fields, whose = saved.model, "the pretrained run's"
    else:
        fields, whose = _file_backbone(path, config.model.backbone), "the file's"
    for field in ARCHITECTURE_FIELDS:
        value = fields.get(field)
        if value is not None and value != config.model[field]:
            logging.info("model.%s = %r, as %s", field, value, whose)
            config.model[field] = value
    return config


def check_own_workdir(workdir: str | epath.Path, pretrained: str | None) -> None:
    """``ConfigError`` if ``workdir`` is the pretraining run's workdir of ``pretrained`` (or
    ``pretrained`` itself, or inside that run's checkpoints): the evaluation writes its lock,
    config, records and checkpoints there. Checked before anything is written."""
    if not pretrained or not epath.Path(pretrained).is_dir():
        return
    run = _pretraining_workdir(epath.Path(pretrained)) or epath.Path(pretrained)
    if canonical(workdir) in (canonical(pretrained), canonical(run)):
        where = "is the pretraining workdir"
    elif is_within(workdir, run / "checkpoints"):
        where = "is inside the checkpoints"
    else:
        return
    raise ConfigError(
        f"--workdir {workdir} {where} of --pretrained {pretrained}: the linear evaluation "
        f"writes its own checkpoints and records; give it a workdir of its own (e.g. "
        f"{run}/linear)"
    )


def _file_backbone(path: epath.Path, backbone: str) -> dict[str, Any]:
    """The architecture fields of the backbone in the PyTorch/detectron2 file ``path``
    (``interop.architecture``); empty when it is not such a file or holds no backbone we know:
    loading it then names the problem, with the setting and the file."""
    if not path.is_file():
        return {}
    try:
        state_dict, _ = formats.read_state_dict(path)
    except WeightBridgeError:
        return {}
    return architecture.backbone_fields(formats.encoder_tensors(state_dict), backbone)


def _workdir_config(path: epath.Path) -> Any | None:
    """The config of the pretraining workdir ``path`` is in (or is: a workdir, its checkpoints
    directory or one step's), if any (``ConfigError`` if its config.json is damaged)."""
    run = _pretraining_workdir(path)
    return None if run is None else load_run_config(run)


def _pretraining_workdir(path: epath.Path) -> epath.Path | None:
    """The workdir (with a config.json) that the directory ``path`` is, or whose checkpoints
    directory or step directory it is."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def setup_linear_run(config: Any, workdir: str | epath.Path) -> Run:
    """``setup_run`` for the linear protocol: the pretrained backbone loaded (fresh runs), the
    classifier's test accuracy as the evaluation and, with ``cached_features``, the training
    views replaced by the features of the unaugmented training images."""
    run = setup_run(config, workdir)
    try:
        if run.data.test_source is None:
            raise ConfigError(f"{config.dataset.name} has no labelled val/ or test/ split")
        if run.data.num_classes != config.linear.num_classes:
            raise ConfigError(
                f"linear.num_classes is {config.linear.num_classes} but {config.dataset.name} has "
                f"{run.data.num_classes} classes"
            )
        monitor = ClassifierMonitor(run.setup, run.data.test_source)
        views = run.train_views
        if config.linear.cached_features:
            views = cached_views(run, monitor)
    except BaseException:
        run.close()
        raise
    every = config.linear.eval_every_epochs
    return dataclasses.replace(
        run, train_views=views, monitor=None, evaluate=monitor.evaluate, eval_every_epochs=every
    )


def backbone_unchanged(run: Run, state: Any) -> bool:
    """The official sanity check: every backbone array (weights and BN statistics) equals the
    pretrained one bit for bit (the random-init one without ``pretrained``)."""
    from moco_jax.interop.init_from import load_encoder_weights

    reference = run.setup.initial_state()
    if run.config.init_from:
        reference = load_encoder_weights(
            run.config.init_from, reference, run.setup, "linear.pretrained"
        )
    encoder = run.setup.algorithm.encoder_variables
    expected, actual = jax.tree.leaves(encoder(reference)), jax.tree.leaves(encoder(state))
    return len(expected) == len(actual) and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(expected, actual, strict=True)
    )


def linear_summary(history: dict, config: Any) -> dict[str, Any]:
    """The last epoch's test accuracy (and the best over evaluated epochs), the protocol used."""
    evaluated = [r for r in history.get("epochs", []) if "test_top1" in r]
    last = evaluated[-1] if evaluated else {}
    linear = config.linear
    protocol = "fine_tune" if linear.train_backbone else "linear"
    return {
        "test_top1": last.get("test_top1"),
        "test_top5": last.get("test_top5"),
        "best_test_top1": max((r["test_top1"] for r in evaluated), default=None),
        "train_loss": history["epochs"][-1]["loss"] if history.get("epochs") else None,
        "epochs": config.epochs,
        "protocol": protocol + ("_cached_features" if linear.cached_features else ""),
        "pretrained": linear.pretrained,
    }


def evaluate_linear(config: Any, workdir: str, pretrained: str | None = None) -> dict[str, Any]:
    """Train and evaluate the linear classifier (or fine-tune) as ``config`` says, in ``workdir``
    (rerunning resumes). Writes ``summary.json`` and ``linear.png``; returns the summary."""
    config = with_pretrained(config, pretrained)
    check_own_workdir(workdir, config.linear.pretrained)
    run = setup_linear_run(config, workdir)
    try:
        history, state = train_loop(run)
        summary = linear_summary(history, config)
        if not config.linear.train_backbone:
            unchanged = backbone_unchanged(run, state)
            summary["backbone_unchanged"] = unchanged
            if unchanged:
                logging.info("sanity check passed: the backbone is bit-for-bit the pretrained one")
            else:
                logging.error("sanity check FAILED: the backbone differs from the pretrained one")
        if jax.process_index() == 0:
            title = f"{config.dataset.name} linear"
            plot_history(history, run.workdir / "linear.png", title, TEST_CURVES, "test accuracy")
            write_atomically(run.workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    finally:
        run.close()
    return summary
