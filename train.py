"""Pretrain MoCo: ``python train.py --config configs/<name>.py --workdir DIR [--config.x=y ...]``.

Every host of a multi-process run (TPU pod, GPU cluster) runs the same command; rerunning with
the same ``--workdir`` resumes from the latest checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' does when a cluster environment is detected.",
)
flags.mark_flags_as_required(["config", "workdir"])

CLUSTER_ENV_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
)


def main(argv):
    del argv
    from moco_jax.cli_errors import quiet_library_logs, run_with_clear_errors

    quiet_library_logs()
    import jax

    if FLAGS.distributed == "on" or (
        FLAGS.distributed == "auto" and any(os.environ.get(v) for v in CLUSTER_ENV_VARS)
    ):
        jax.distributed.initialize()
    logging.info(
        "process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )

    from moco_jax.trainer import train_and_evaluate

    summary = run_with_clear_errors(train_and_evaluate, FLAGS.config, FLAGS.workdir)
    if summary is not None and jax.process_index() == 0:
        print("summary:", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)
