"""train.py as two JAX processes of 4 CPU devices, like two pod hosts: preempted, killed, resumed.

The processes meet through ``jax.distributed`` on loopback (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and each reads its own half of the data. One run is stopped
twice and restarted each time with the same command on both processes:

1. SIGTERM reaches process 1 only. JAX's preemption sync and orbax's PreemptionCheckpointingPolicy
   make both processes save the same step and exit with 143.
2. Both restart and restore that step. Process 0 is SIGKILLed mid-run; process 1, stuck in a
   collective, is killed too (as a pod's scheduler would).
3. Both restart and finish: checkpoints, the kNN monitor, the summary.

The run must end bit-for-bit equal to an uninterrupted run of 1 process with the same 8 devices:
every array of the final checkpoint, every step and epoch record, the baselines and the summary.
That takes ``ordered_reductions`` (means over devices added in device order): a cross-process
all-reduce (gloo) adds the devices' values in another order than the in-process one does, and
the results of 2 x 4 and 1 x 8 devices would differ in the last bits.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess

import forkserver
import numpy as np
import pytest
from data_fixtures import fashion_mnist_data_dir
from test_resume import _checkpoint, _records, _steps_on_disk
from xla_flags import cpu_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 16  # one epoch: 1024 examples / batch 64
SIGTERM_AT, KILL_AT = 2, 14  # process 1 gets SIGTERM after step 2; process 0 dies after step 14
FIELDS = {
    # The MLP backbone compiles in a fraction of the ResNet's time (the state has the same
    # parts), and so do views without the colour jitter.
    "model.backbone": "mlp",
    "model.width_multiplier": 0.25,
    "dataset.image_size": 28,
    "dataset.max_train_examples": 1024,
    "augment.jitter_prob": 0.0,
    "augment.grayscale_prob": 0.0,
    "epochs": 1,  # the kNN monitor's programs compile once, in the last leg
    "checkpoint.every_steps": 3,
    "log_every_steps": 1,
    "ordered_reductions": True,  # the same sums on 2 x 4 devices as on 1 x 8
}
# Each restart of process 1 compiles all its programs again: jax's persistent cache keeps
# process 0's only (the CPU topology in the cache key names the process). The tests' XLA flags
# (tests/xla_flags.py: LLVM without its optimisation passes) make that fast.


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, leg, faults=({}, {}), nice=0):
    """The processes of one run of train.py in the background (logs beside the workdir), one
    for each of ``faults`` (its MOCO_JAX_FAULT_* variables) with ``8 / len(faults)`` devices."""
    port = _free_port()
    while port in _start.ports:  # one that a run started earlier may not have bound yet
        port = _free_port()
    _start.ports.add(port)
    processes = []
    for index, fault in enumerate(faults):
        env = dict(os.environ, MOCO_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
        env.update({name: str(step) for name, step in fault.items()})
        devices = 8 // len(faults)
        env["XLA_FLAGS"] = cpu_devices(devices)
        if len(faults) > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_PROCESS_ID=str(index))
            env["JAX_NUM_PROCESSES"] = str(len(faults))
        entry = [str(ROOT / "tests/with_faults.py")] if fault else []  # installs faults.py
        command = [*entry, str(ROOT / "train.py"), "--workdir", str(workdir)]
        command += ["--config", str(ROOT / "configs/smoke.py")]
        command += [f"--config.dataset.data_dir={_start.data_dir}"]
        command += [f"--config.{name}={value}" for name, value in FIELDS.items()]
        logs = [workdir.parent / f"{workdir.name}.{leg}.p{index}.{s}" for s in ("out", "err")]
        # A fork of a process that imported train.py's modules once (tests/forkserver.py).
        process = forkserver.server().start(
            command, env=env, stdout=logs[0], stderr=logs[1], nice=nice
        )
        processes.append(process)
    return processes


def _wait(processes, kill_the_rest=False):
    """Wait for the processes (first one first); with ``kill_the_rest``, SIGKILL the others as
    soon as the first has ended. Returns each one's exit code, stdout and stderr."""
    results = []
    for process in processes:
        if kill_the_rest and results and process.poll() is None:
            process.kill()
        code = process.wait(timeout=600)
        out, err = (path.read_text() for path in process.logs)
        results.append(subprocess.CompletedProcess(process.args, code, out, err))
    return results


def _failure(what, results):
    """``what``, with each process's exit code and the end of its stderr."""
    ends = [f"process {i}: exit {r.returncode}\n{r.stderr[-2500:]}" for i, r in enumerate(results)]
    return "\n".join([what, *ends])


def _lines_up_to(workdir, step):
    """The metrics.jsonl lines of steps <= ``step``, as written (images/sec included)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [line for line in lines if json.loads(line)["step"] <= step]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    _start.data_dir, _start.ports = fashion_mnist_data_dir(), set()
    root = tmp_path_factory.mktemp("multiprocess_train")
    started = []
    try:
        return {"root": root, **_legs(root, started)}
    finally:  # none left behind by a failure
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def _legs(root, started):
    """The interrupted run's three legs and the uninterrupted 1-process run."""

    def start(*args, **kwargs):
        started.extend(processes := _start(*args, **kwargs))
        return processes

    interrupted = root / "interrupted"
    sigterm = start(interrupted, "sigterm", ({}, {"MOCO_JAX_FAULT_SIGTERM_AT_STEP": SIGTERM_AT}))
    # The uninterrupted run, 1 process x 8 devices, meanwhile, at a low priority: it uses the
    # CPU that the legs leave while they wait in collectives.
    reference = start(root / "one_process", "run", ({},), nice=10)
    sigterm = _wait(sigterm)
    saved = {"after_sigterm": _steps_on_disk(interrupted)}
    assert saved["after_sigterm"], _failure("no checkpoint after the SIGTERM leg", sigterm)
    lines_after_sigterm = _lines_up_to(interrupted, saved["after_sigterm"][-1])

    kill = {"MOCO_JAX_FAULT_KILL_AT_STEP": KILL_AT}
    killed = _wait(start(interrupted, "kill", (kill, {})), kill_the_rest=True)
    saved["after_kill"] = _steps_on_disk(interrupted)
    assert saved["after_kill"], _failure("no checkpoint after the killed leg", killed)
    lines_after_kill = _lines_up_to(interrupted, saved["after_kill"][-1])
    finish = _wait(start(interrupted, "finish"))
    return {
        "sigterm": sigterm,
        "killed": killed,
        "finish": finish,
        "reference": _wait(reference),
        "lines_after_sigterm": lines_after_sigterm,
        "lines_after_kill": lines_after_kill,
        **saved,
    }


def _stopped_step(result):
    """The step named by a run's last line 'stopped: SIGTERM: saved step N to ...'."""
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("stopped: SIGTERM: saved step "), result.stderr[-3000:]
    return int(last_line.split()[4])


def test_sigterm_to_one_process_saves_one_step_on_both(runs):
    results = runs["sigterm"]
    assert [r.returncode for r in results] == [128 + signal.SIGTERM] * 2, results[1].stderr[-3000:]
    steps = [_stopped_step(r) for r in results]
    assert steps[0] == steps[1] > SIGTERM_AT
    assert runs["after_sigterm"][-1] == steps[0]  # the agreed step is the newest checkpoint
    for result in results:
        assert "Traceback" not in result.stderr


def test_restarted_processes_restore_the_preemption_checkpoint(runs):
    saved = runs["after_sigterm"][-1]
    # The step records up to the restored step stay as the first leg wrote them (a run restored
    # from an older checkpoint would have rewritten those after it), the later ones follow.
    assert _lines_up_to(runs["root"] / "interrupted", saved) == runs["lines_after_sigterm"]
    assert len(runs["lines_after_sigterm"]) == saved
    first, second = runs["killed"]
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert second.returncode != 0  # killed, or failed in a collective without its peer
    # Checkpoints after the restored step (9 is complete once 12's save starts), none after
    # the kill.
    assert saved < 9 <= runs["after_kill"][-1] <= 12
    resumed_at = runs["after_kill"][-1]
    assert _lines_up_to(runs["root"] / "interrupted", resumed_at) == runs["lines_after_kill"]


def test_killed_and_resumed_run_equals_one_process_with_all_devices(runs):
    root = runs["root"]
    for result in (*runs["finish"], *runs["reference"]):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    assert "summary: knn_pixels=" in runs["finish"][0].stdout
    assert "summary:" not in runs["finish"][1].stdout  # process 0 reports
    interrupted, reference = root / "interrupted", root / "one_process"
    leftovers = [p.name for p in (interrupted / "checkpoints").iterdir() if "tmp" in p.name]
    assert not leftovers, leftovers

    arrays, meta = _checkpoint(interrupted, STEPS)
    expected, expected_meta = _checkpoint(reference, STEPS)
    assert arrays.keys() == expected.keys()
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)
    assert meta["fingerprint"] == expected_meta["fingerprint"]
    steps = _records(interrupted / "metrics.jsonl", "step", drop="images_per_sec")
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert steps == _records(reference / "metrics.jsonl", "step", drop="images_per_sec")
    epochs = _records(interrupted / "epochs.jsonl", "epoch", drop="knn_seconds")
    assert sorted(epochs) == [1] and "knn_head" in epochs[1]
    assert epochs == _records(reference / "epochs.jsonl", "epoch", drop="knn_seconds")
    for name in ("summary.json", "baselines.json"):
        assert (interrupted / name).read_text() == (reference / name).read_text(), name


def test_process_count_and_id_come_from_the_environment(monkeypatch):
    """What a cluster that jax does not detect sets on each host, beside
    JAX_COORDINATOR_ADDRESS (which jax reads itself)."""
    import jax

    from moco_jax.run import cli_errors

    def fail(message):
        raise SystemExit(message)

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(cli_errors, "fail", fail)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "16")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    cli_errors.initialize_distributed("auto", ("JAX_COORDINATOR_ADDRESS",))
    assert calls == [{"num_processes": 16, "process_id": 3}]
    monkeypatch.setenv("JAX_PROCESS_ID", "three")
    with pytest.raises(SystemExit, match="^JAX_PROCESS_ID='three': expected a whole number$"):
        cli_errors.initialize_distributed("on", ())
    assert len(calls) == 1
