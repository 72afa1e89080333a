"""Pretrain MoCo: ``python train.py --config configs/<name>.py --workdir DIR [--config.x=y ...]``.

Every host of a multi-process run (TPU pod, GPU cluster) runs the same command; rerunning with
the same ``--workdir`` resumes from the latest checkpoint. A bad command line, config or input
is one ``error:`` line and exit code 2.
"""

import os
import sys

from absl import app, flags, logging

from moco_jax import cli_errors

FLAGS = flags.FLAGS
cli_errors.define_config_file("config", "Config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' does when a cluster environment is detected.",
)

CLUSTER_ENV_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
)


def main(argv):
    del argv
    cli_errors.quiet_library_logs()
    import jax

    cli_errors.initialize_distributed(FLAGS.distributed, CLUSTER_ENV_VARS)
    logging.info(
        "process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )

    from moco_jax.trainer import train_and_evaluate

    summary = cli_errors.run_with_clear_errors(train_and_evaluate, FLAGS.config, FLAGS.workdir)
    if summary is not None and jax.process_index() == 0:
        print("summary:", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main, flags_parser=cli_errors.flags_parser(required=("config", "workdir")))
