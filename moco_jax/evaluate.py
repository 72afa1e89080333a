"""Evaluate pretrained weights, two ways:

``python -m moco_jax.evaluate knn --workdir DIR``: rebuilds the run from ``DIR/config.json``,
restores the latest checkpoint (or ``--step``), and reports weighted-kNN top-1 on the head and
backbone features next to the raw-pixel and random-init baselines of the same data (those of
the run's ``baselines.json``; ``--recompute_baselines`` computes them again), so the gain from
pretraining is visible. The workdir is read without its lock, so it works while the run trains;
the result is printed and written to ``DIR/knn_eval/step_N.json``.

``python -m moco_jax.evaluate linear --config configs/linear_imagenet.py --pretrained P
--workdir OUT``: the paper's linear classification protocol on frozen features (or fine-tuning,
``--config.linear.train_backbone=True``), from a pretraining workdir or a ``.pth`` file ``P``;
``OUT/summary.json`` holds ``test_top1`` and ``test_top5`` (see
``moco_jax.run.linear_eval``).
Rerunning the same command resumes. On a pod every host runs the same command, as ``train.py``
(``--distributed``).

``python -m moco_jax.evaluate show --workdir DIR [--step N]``: pictures of what the features
mean, written into ``DIR/show/step_N/`` (the run's own are beside ``pretraining.png``):
``neighbours.png`` (test images and their nearest training images) and
``embedding.png`` (t-SNE of the features beside raw pixels; needs scikit-learn). ``--config C
--pretrained FILE --workdir OUT`` shows PyTorch weights (as ``linear`` takes them) on C's data,
into OUT (see ``moco_jax.run.show``).
"""

from __future__ import annotations

import json
from typing import Any

from absl import app, flags, logging
from etils import epath

from moco_jax import storage
from moco_jax.run.cli_errors import define_config_file, define_distributed_flag
from moco_jax.run.saved_run import load_run_config, saved_steps
from moco_jax.storage import read_text

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined when it runs as a program (not on import: the library
    functions here are imported beside other commands' modules)."""
    flags.DEFINE_string(
        "workdir", None, "knn: a pretraining run's workdir; linear: the evaluation's own workdir."
    )
    define_config_file("config", "linear: a linear-evaluation config (configs/linear_*.py).")
    define_distributed_flag()  # every host of a pod runs the same command, as train.py
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
    flags.DEFINE_string("data_dir", None, "Override dataset.data_dir of the saved config.")
    flags.DEFINE_bool(
        "recompute_baselines",
        False,
        "knn: compute the raw-pixel and random-init baselines again instead of reading the "
        "run's baselines.json.",
    )
    flags.DEFINE_string(
        "pretrained",
        None,
        "linear: a pretraining workdir (or its checkpoints/step directory), an official MoCo "
        ".pth.tar or a torchvision state dict (sets config.linear.pretrained).",
    )


def evaluate_knn(
    workdir: str,
    step: int | None = None,
    data_dir: str | None = None,
    recompute_baselines: bool = False,
) -> dict:
    """kNN top-1 (%) of a saved checkpoint, with the baselines: those the run wrote
    (``baselines.json``) unless there are none or ``recompute_baselines``.

    The workdir is only read, without its lock (as ``export``), so a run may be training there:
    damaged checkpoints are skipped, never moved. The result goes to its own file,
    ``DIR/knn_eval/step_N.json`` (written whole, atomically): never among the run's checkpoints
    or records, and two evaluations of other steps never write the same file."""
    import jax

    from moco_jax.config.checks import ConfigError
    from moco_jax.run.run_setup import setup_run

    workdir_path = epath.Path(workdir)
    config = _saved_run_config(workdir_path, step, data_dir)
    saved_baselines = None if recompute_baselines else _saved_baselines(workdir_path)
    run = setup_run(config, workdir_path, read_only=True)
    try:
        if run.monitor is None:
            raise ConfigError(
                f"{config.dataset.name} has no labelled val/ or test/ split: nothing to test kNN on"
            )
        initial = run.setup.initial_state()
        state = run.checkpointer.restore(step, initial) if step is not None else run.state
        encoder = run.setup.algorithm.encoder_variables
        baselines = saved_baselines or run.monitor.baselines(encoder(initial))
        result = {"step": int(state.step), **baselines}
        result.update(run.monitor.evaluate(encoder(state)))
    finally:
        run.close()
    if jax.process_index() == 0:
        output = workdir_path / "knn_eval" / f"step_{result['step']}.json"
        output.parent.mkdir(exist_ok=True)
        storage.write_whole(output, json.dumps(result, indent=2) + "\n", "the kNN result")
        result["output"] = str(output)
    return result


def _saved_baselines(workdir: epath.Path) -> dict | None:
    """The run's ``baselines.json`` (None: not written yet, or damaged: computed again)."""
    path = workdir / "baselines.json"
    try:
        saved = json.loads(read_text(path)) if path.exists() else None
    except ValueError:
        logging.warning("%s is damaged; the baselines are computed again", path)
        return None
    return saved if isinstance(saved, dict) and "knn_pixels" in saved else None


def show(workdir: str, step: int | None = None, data_dir: str | None = None, config=None,
         pretrained: str | None = None) -> list:  # fmt: skip
    """``neighbours.png`` and ``embedding.png`` of a saved checkpoint (or of ``pretrained``'s
    weights on ``config``'s data), written into ``workdir``."""
    import jax

    from moco_jax.config.checks import ConfigError
    from moco_jax.run.run_setup import setup_run
    from moco_jax.run.show import write_pictures
    from moco_jax.storage import absolute

    if jax.process_count() > 1:
        raise ConfigError("show draws on one host: run it as one process (no --distributed)")
    workdir_path = epath.Path(workdir)
    if pretrained is None:
        config = _saved_run_config(workdir_path, step, data_dir)
    else:
        config = config.copy_and_resolve_references()
        config.init_from = absolute(pretrained)  # loaded into the fresh state (no checkpoint)
        if data_dir is not None:
            config.dataset.data_dir = data_dir
    run = setup_run(config, workdir_path, read_only=pretrained is None)
    try:
        state = run.state
        if step is not None:
            state = run.checkpointer.restore(step, run.setup.initial_state())
        name = epath.Path(pretrained).name if pretrained else workdir_path.name
        # A run's workdir: its own folder per step, beside what the run writes (knn_eval/).
        out = workdir_path if pretrained else workdir_path / "show" / f"step_{int(state.step)}"
        out.mkdir(parents=True, exist_ok=True)
        return write_pictures(run, state, out, f"{name}, step {int(state.step)}").paths
    finally:
        run.close()


def _saved_run_config(workdir: epath.Path, step: int | None, data_dir: str | None) -> Any:
    """The config a saved run was trained with (``data_dir`` overriding its data directory), once
    its checkpoints are known to hold ``step`` (or any, for the latest): before data is loaded."""
    config = load_run_config(workdir)
    if data_dir is not None:
        config.dataset.data_dir = data_dir
    _check_saved(workdir, step, saved_steps(workdir))
    return config


def _check_saved(workdir: epath.Path, step: int | None, steps: list[int]) -> None:
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: nothing to evaluate")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}; saved: {steps}")


def main(argv):
    from moco_jax.run.cli_errors import (
        fail,
        initialize_distributed,
        quiet_library_logs,
        run_with_clear_errors,
    )

    quiet_library_logs()
    if argv[1] == "linear" and FLAGS.config is None:
        fail("linear needs --config (e.g. configs/linear_fashion_mnist.py)")
    if argv[1] == "knn" and (FLAGS.config is not None or FLAGS.pretrained is not None):
        fail("knn evaluates a pretraining workdir: --config and --pretrained are for linear")
    if argv[1] == "show" and (FLAGS.config is None) != (FLAGS.pretrained is None):
        fail("show takes a pretraining --workdir, or --config and --pretrained together")
    initialize_distributed(FLAGS.distributed)
    if argv[1] == "linear":
        from moco_jax.run.linear_eval import evaluate_linear

        summary = run_with_clear_errors(
            evaluate_linear, FLAGS.config, FLAGS.workdir, FLAGS.pretrained
        )
        print(
            f"linear evaluation ({summary['protocol']}, {summary['epochs']} epoch"
            f"{'s' if summary['epochs'] != 1 else ''}): test top-1 "
            f"{summary['test_top1']:.2f}%, top-5 {summary['test_top5']:.2f}% "
            f"(best top-1 {summary['best_test_top1']:.2f}%)"
        )
        if "backbone_unchanged" in summary:
            print(f"backbone bit-for-bit the pretrained one: {summary['backbone_unchanged']}")
        return
    if argv[1] == "show":
        args = (FLAGS.workdir, FLAGS.step, FLAGS.data_dir, FLAGS.config, FLAGS.pretrained)
        for path in run_with_clear_errors(show, *args):
            print(f"wrote {path}")
        return
    args = (FLAGS.workdir, FLAGS.step, FLAGS.data_dir, FLAGS.recompute_baselines)
    result = run_with_clear_errors(evaluate_knn, *args)
    print(f"step {result['step']} (written to {result.get('output')}):")
    print(f"  kNN top-1, head features      {result['knn_head']:6.2f}%")
    print(f"  kNN top-1, backbone features  {result['knn_backbone']:6.2f}%")
    print(f"  raw pixels                    {result['knn_pixels']:6.2f}%")
    print(f"  random-init encoder (head)    {result['random_init_knn_head']:6.2f}%")


def run() -> None:
    """The program: python -m moco_jax.evaluate, and the moco-evaluate script."""
    from moco_jax.run.cli_errors import flags_parser, quiet_native_logs

    quiet_native_logs()
    define_flags()
    commands = ("knn", "linear", "show")
    parser = flags_parser(required=("workdir",), commands=commands, usage=__doc__)
    app.run(main, flags_parser=parser)


if __name__ == "__main__":
    run()
