"""Evaluate a saved run: ``python -m moco_jax.evaluate knn --workdir DIR``.

Rebuilds the run from ``DIR/config.json``, restores the latest checkpoint (or ``--step``), and
reports weighted-kNN top-1 on the head and backbone features next to the raw-pixel and
random-init baselines of the same data, so the gain from pretraining is visible. The result is
printed and written to ``DIR/knn_eval.json``.
"""

from __future__ import annotations

import json
import sys

import ml_collections
from absl import app, flags
from etils import epath

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A pretraining run's workdir (holds config.json).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_string("data_dir", None, "Override dataset.data_dir of the saved config.")


def load_run_config(workdir: epath.Path) -> ml_collections.ConfigDict:
    """The config a run was started with."""
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a moco_jax workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def evaluate_knn(workdir: str, step: int | None = None, data_dir: str | None = None) -> dict:
    """kNN top-1 (%) of a saved checkpoint, with the baselines."""
    import jax

    from moco_jax.run_setup import setup_run

    workdir_path = epath.Path(workdir)
    config = load_run_config(workdir_path)
    if data_dir is not None:
        config.dataset.data_dir = data_dir
    run = setup_run(config, workdir_path)
    available = run.checkpointer.manager.all_steps()
    if not available:
        raise FileNotFoundError(f"no checkpoint in {workdir_path / 'checkpoints'}")
    initial = run.setup.initial_state()
    state = run.checkpointer.restore(step, initial) if step is not None else run.state
    encoder = run.setup.algorithm.encoder_variables
    result = {"step": int(state.step), **run.monitor.baselines(encoder(initial))}
    result.update(run.monitor.evaluate(encoder(state)))
    run.checkpointer.close()
    if jax.process_index() == 0:
        (workdir_path / "knn_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv):
    if len(argv) != 2 or argv[1] != "knn":
        print("usage: python -m moco_jax.evaluate knn --workdir DIR [--step N]", file=sys.stderr)
        sys.exit(2)
    if not FLAGS.workdir:
        print("error: --workdir is required", file=sys.stderr)
        sys.exit(2)
    from moco_jax.cli_errors import quiet_library_logs, run_with_clear_errors

    quiet_library_logs()
    result = run_with_clear_errors(evaluate_knn, FLAGS.workdir, FLAGS.step, FLAGS.data_dir)
    print(f"step {result['step']}:")
    print(f"  kNN top-1, head features      {result['knn_head']:6.2f}%")
    print(f"  kNN top-1, backbone features  {result['knn_backbone']:6.2f}%")
    print(f"  raw pixels                    {result['knn_pixels']:6.2f}%")
    print(f"  random-init encoder (head)    {result['random_init_knn_head']:6.2f}%")


if __name__ == "__main__":
    app.run(main)
