"""One of several JAX processes on this machine (CPU, gloo collectives), like hosts of a pod.

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT. Prints JSON lines.
"""

import json
import os
import pathlib
import sys

process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moco_jax import build  # noqa: E402
from moco_jax.data.resident import ResidentTrainSet, put_sharded  # noqa: E402
from moco_jax.mesh import make_data_mesh, shard_batch  # noqa: E402
from tiny import image_batches, tiny_config  # noqa: E402


def emit(**record):
    print(json.dumps({"process": process_id, **record}), flush=True)


mesh = make_data_mesh()
emit(devices=jax.device_count(), local_devices=jax.local_device_count())

# Each process holds its own share of the examples (as tfds.split_for_jax_process gives it).
per_process = 64
ids = np.arange(process_id * per_process, (process_id + 1) * per_process, dtype=np.int32)
images, labels, per_device = put_sharded(
    mesh, ids.astype(np.uint8)[:, None, None, None], ids, False
)
train_set = ResidentTrainSet(mesh, images, labels, per_device, 4, seed=0)
pick = jax.jit(  # the step's row of the epoch's on-device index table, as the view function does
    jax.shard_map(
        lambda lab, table, step: lab[table[step]],
        mesh=mesh,
        in_specs=(P("data"), P(None, "data"), P()),
        out_specs=P("data"),
    ),
    static_argnums=2,
)
seen = []
for epoch in range(2):
    table = train_set.device_epoch_indices(epoch)
    for step in range(train_set.steps_per_epoch):
        batch = pick(labels, table, step)
        seen.append(multihost_utils.process_allgather(batch, tiled=True))
emit(epoch_ids=[np.concatenate(seen[:4]).tolist(), np.concatenate(seen[4:]).tolist()])

# One MoCo step with Shuffle-BN across all 8 devices of both processes.
config = tiny_config()
built = build(config, steps_per_epoch=2)
state = built.initial_state()
((images_q, images_k),) = image_batches(config, steps=1)
share = slice(process_id * 32, (process_id + 1) * 32)
state, metrics = built.algorithm.train_step(
    state, shard_batch(mesh, images_q[share]), shard_batch(mesh, images_k[share])
)
queue = multihost_utils.process_allgather(state.queue, tiled=True)
emit(loss=float(metrics["loss"]), queue_ptr=int(metrics["queue_ptr"]), queue_sum=float(queue.sum()))
