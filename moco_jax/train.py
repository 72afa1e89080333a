"""Pretrain MoCo: python train.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]
(the same as python -m moco_jax.train, or moco-train once the package is installed).

Every host of a multi-process run (TPU pod, GPU cluster) runs the same command; rerunning with
the same --workdir resumes from the latest checkpoint. A bad command line, config or input is
one error: line and exit code 2.
"""

import os

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined when it runs as a program (not on import)."""
    from moco_jax.run import cli_errors

    cli_errors.define_config_file(
        "config",
        "Config file (configs/*.py); then --config.KEY=VALUE sets any of its fields, e.g. "
        "--config.batch_size=128, or --config.imports=my_pkg.my_backbone (a fork's modules).",
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
    cli_errors.define_distributed_flag()
    flags.DEFINE_string(
        "compile_for",
        None,
        "Compile the whole run for a TPU slice (e.g. v5e:16x16) and report memory per chip, "
        "collectives and a FLOPs bound instead of training (needs libtpu: requirements-tpu.txt).",
    )
    flags.DEFINE_string(
        "compile_report",
        None,
        "--compile_for's JSON report (default: <workdir>/compile_report.json).",
    )
    flags.DEFINE_bool(
        "compile_search_batch",
        False,
        "--compile_for: also find the largest per-chip batch whose training step fits "
        "(compiles more).",
    )


def main(argv):
    del argv
    from moco_jax.run import cli_errors

    cli_errors.quiet_library_logs()
    if FLAGS.compile_for:
        return compile_only()
    import jax

    cli_errors.initialize_distributed(FLAGS.distributed)
    logging.info(
        "process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )

    from moco_jax.run.trainer import train_and_evaluate

    summary = cli_errors.run_with_clear_errors(train_and_evaluate, FLAGS.config, FLAGS.workdir)
    if summary is not None and jax.process_index() == 0:
        print("summary:", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        if note := below_random_init(summary):
            print(f"note: {note}")


def below_random_init(summary: dict) -> str | None:
    """What to read into a kNN top-1 below the random-init encoder's, or None when it is not."""
    knn, random_init = summary.get("final_knn_head"), summary.get("random_init_knn_head")
    if knn is None or random_init is None or knn >= random_init:
        return None
    return (
        f"kNN top-1 {knn:.1f}% is below the random-init encoder's {random_init:.1f}%: expected "
        "early in pretraining (a few hundred steps or fewer, as configs/smoke.py's 8): the "
        "features leave the random init's before they learn; longer runs pass it"
    )


def compile_only():
    """--compile_for: one process compiles for the whole slice; nothing trains or is read."""
    from moco_jax.run import cli_errors

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the slice's devices come from libtpu
    from moco_jax.pod import compile_for

    os.makedirs(FLAGS.workdir, exist_ok=True)
    report = FLAGS.compile_report or os.path.join(FLAGS.workdir, "compile_report.json")
    args = (FLAGS.config, FLAGS.compile_for, report, FLAGS.compile_search_batch)
    cli_errors.run_with_clear_errors(compile_for.main, *args)


def run() -> None:
    """The program: train.py, python -m moco_jax.train and the moco-train script."""
    from moco_jax.run import cli_errors

    cli_errors.quiet_native_logs()
    define_flags()
    parser = cli_errors.flags_parser(required=("config", "workdir"), usage=__doc__)
    app.run(main, flags_parser=parser)


if __name__ == "__main__":
    run()
