"""Two JAX processes on this machine stand in for two pod hosts: data sharding and the step."""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tiny import build, image_batches, run_steps, tiny_config

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_records():
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), "2", port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    records = {}
    for out, _ in outputs:
        for line in out.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                records.setdefault(record.pop("process"), {}).update(record)
    return records


def test_every_example_once_per_epoch_across_processes(worker_records):
    assert worker_records[0]["devices"] == 8 and worker_records[0]["local_devices"] == 4
    for epoch_ids in worker_records[0]["epoch_ids"]:
        assert sorted(epoch_ids) == list(range(128))  # both processes' examples, each once
    first, second = worker_records[0]["epoch_ids"]
    assert first != second
    assert worker_records[1]["epoch_ids"] == worker_records[0]["epoch_ids"]


def test_two_processes_train_like_one(worker_records):
    """Shuffle-BN across processes gives the step of one process with the same 8 devices."""
    config = tiny_config()
    engine, state = build(config, 8)
    state, (metrics,) = run_steps(engine, state, image_batches(config, steps=1))
    for process in (0, 1):
        record = worker_records[process]
        assert record["queue_ptr"] == metrics["queue_ptr"] == 64
        np.testing.assert_allclose(record["loss"], metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(
            record["queue_sum"], float(np.asarray(state.queue).sum()), rtol=1e-4
        )
