"""Preemption-proof training, end to end through train.py on real Fashion-MNIST (smoke config).

One run is interrupted twice: SIGTERM after step 5 (it must save step 5 and stop with 143), then
SIGKILL right after step 12's checkpoint save has started (the write may be cut off half-way).
Rerun each time with the same command, it must end with parameters, EMA parameters, BN
statistics, optimizer state, queue, step, RNG and metrics bit-for-bit equal to an uninterrupted
run. A NaN injected into the loss must stop a run with one clear line and exit code 2, leaving the
last good checkpoint intact. The faults come from tests/faults.py (through with_faults.py); the
uninterrupted run and the NaN run go alongside the interrupted one to save wall time. Each run is
a fork of a process that imported train.py's modules once (tests/forkserver.py).
"""

import json
import os
import pathlib
import signal
import subprocess

import forkserver
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_fixtures import fashion_mnist_data_dir
from xla_flags import cpu_devices

from moco_jax.run.fingerprint import summarize

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPOCHS, STEPS_PER_EPOCH = 2, 8  # smoke.py: 512 examples / batch 64
# The MLP backbone (on the full 28x28 images) traces and compiles in a fraction of the ResNet's
# time; the state has the same parts (params, BN statistics, EMA copies, momentum, queue, RNG).
MODEL = ["--config.model.backbone=mlp", "--config.model.width_multiplier=0.25"]
RUN = [
    *MODEL,
    "--config.dataset.image_size=28",
    "--config.epochs=2",
    "--config.checkpoint.every_steps=3",
    # Records every 2 steps, checkpoints every 3: a run stopped at step 5 or 9 resumes inside a
    # logging window, whose loss (the window's mean) must still come out bit for bit.
    "--config.log_every_steps=2",
]


def _start(workdir, *overrides, fault=None):
    """train.py in the background; stdout/stderr go to files next to the workdir."""
    env = dict(os.environ, MOCO_JAX_NO_PROGRESS="1")
    env["XLA_FLAGS"] = cpu_devices(8)
    for name in ("KILL", "KILL_AFTER_COMMIT", "SIGTERM", "NAN"):
        env.pop(f"MOCO_JAX_FAULT_{name}_AT_STEP", None)
    if fault:
        env[f"MOCO_JAX_FAULT_{fault[0]}_AT_STEP"] = str(fault[1])
    entry = [str(ROOT / "tests/with_faults.py")] if fault else []  # installs faults.py
    command = [*entry, str(ROOT / "train.py")]
    command += ["--config", str(ROOT / "configs/smoke.py")]
    command += ["--workdir", str(workdir), f"--config.dataset.data_dir={_start.data_dir}"]
    logs = workdir.parent / f"{workdir.name}.{fault[0].lower() if fault else 'run'}"
    return forkserver.server().start(
        [*command, *overrides], env=env, stdout=f"{logs}.out", stderr=f"{logs}.err"
    )


def _wait(process):
    returncode = process.wait(timeout=600)
    out, err = (path.read_text() for path in process.logs)
    return subprocess.CompletedProcess(process.args, returncode, out, err)


def _steps_on_disk(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    _start.data_dir = fashion_mnist_data_dir()
    root = tmp_path_factory.mktemp("resume")
    reference = _start(root / "reference", *RUN)
    interrupted = root / "interrupted"
    sigterm = _wait(_start(interrupted, *RUN, fault=("SIGTERM", 5)))
    after_sigterm = _steps_on_disk(interrupted)
    nan_run = [*RUN, "--config.checkpoint.every_steps=2", "--config.log_every_steps=100"]
    nan = _start(root / "nan", *nan_run, fault=("NAN", 5))
    # Killed once epoch 1's checkpoint (step 8) is completely written: its record must be there.
    commit_kill = _wait(_start(interrupted, *RUN, fault=("KILL_AFTER_COMMIT", 8)))
    after_commit_kill = _steps_on_disk(interrupted)
    records_after_commit_kill = _records(interrupted / "epochs.jsonl", "epoch", drop="")
    kill = _wait(_start(interrupted, *RUN, fault=("KILL", 12)))
    after_kill = _steps_on_disk(interrupted)
    # What a kill in the middle of a write would leave: a half line, a truncated JSON file, and
    # epoch 1's record cut (the checkpoint, at step 9 or 12, is past it: it keeps that record).
    with (interrupted / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 5.')
    baselines = interrupted / "baselines.json"
    baselines.write_text(baselines.read_text()[:20])
    epochs = interrupted / "epochs.jsonl"
    epoch_1 = epochs.read_text()
    epochs.write_text(epoch_1[: len(epoch_1) // 2])
    finish = _wait(_start(interrupted, *RUN))
    return {
        "root": root,
        "reference": _wait(reference),
        "sigterm": sigterm,
        "after_sigterm": after_sigterm,
        "commit_kill": commit_kill,
        "after_commit_kill": after_commit_kill,
        "records_after_commit_kill": records_after_commit_kill,
        "epoch_1": epoch_1,
        "kill": kill,
        "after_kill": after_kill,
        "finish": finish,
        "nan": _wait(nan),
    }


def test_sigterm_saves_the_current_step_and_stops(runs):
    result = runs["sigterm"]
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("stopped: SIGTERM: saved step 5 to "), last_line
    assert last_line.endswith("rerun the same command to resume")
    assert "Traceback" not in result.stderr
    # Step 5 is no multiple of checkpoint.every_steps=3: only SIGTERM saved it.
    assert runs["after_sigterm"] == [3, 5]


def _final_arrays(workdir):
    """Every array of the last checkpoint, by path, as NumPy, and its metadata."""
    return _checkpoint(workdir, EPOCHS * STEPS_PER_EPOCH)


def _checkpoint(workdir, step):
    """One step's arrays by path as NumPy (read by orbax, no model needed) and its metadata."""
    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    tree = manager.item_metadata(step)["state"].tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(tree, restore_args))
    restored = manager.restore(step, args=args)["state"]
    meta = manager.metadata(step).custom_metadata
    manager.close()
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in flat}, meta


def _records(path, key, drop):
    """The last record per ``key`` (a resumed run redoes the steps after its checkpoint)."""
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        records[record[key]] = {k: v for k, v in record.items() if k != drop}
    return records


def test_records_survive_a_kill_right_after_a_committed_checkpoint(runs):
    assert runs["commit_kill"].returncode == -signal.SIGKILL
    assert runs["after_commit_kill"][-1] == 8  # epoch 1's checkpoint was complete
    # Epoch 1's record was written before the checkpoint that covers it.
    assert sorted(runs["records_after_commit_kill"]) == [1]
    finish = runs["finish"].stderr
    assert "metrics.jsonl line" in finish and "is damaged" in finish  # the half line


def test_a_cut_record_and_damaged_baselines_come_back_from_the_checkpoint(runs):
    """Epoch 1's record, cut after the checkpoint passed it, is rewritten as it was (its kNN
    figures and timing included); the baselines too, taken from the checkpoint, not recomputed."""
    interrupted, finish = runs["root"] / "interrupted", runs["finish"].stderr
    assert runs["finish"].returncode == 0, finish[-3000:]
    for name in ("epochs.jsonl", "baselines.json"):
        assert f"{name} was missing or damaged: rewritten from checkpoint step" in finish, name
    assert "computed again" not in finish
    epoch_1 = runs["epoch_1"]
    assert [json.loads(line)["epoch"] for line in epoch_1.splitlines()] == [1]
    assert "knn_head" in epoch_1 and "knn_seconds" in epoch_1
    assert (interrupted / "epochs.jsonl").read_text().startswith(epoch_1)
    expected = (runs["root"] / "reference" / "baselines.json").read_text()
    assert (interrupted / "baselines.json").read_text() == expected


def test_killed_and_resumed_run_equals_an_uninterrupted_one(runs):
    root = runs["root"]
    for name in ("reference", "finish"):
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert runs["kill"].returncode == -signal.SIGKILL
    # Killed right after step 12's save started: 12 is on disk only if the write completed.
    assert runs["after_kill"][-1] in (9, 12) and 9 in runs["after_kill"]
    interrupted, reference = root / "interrupted", root / "reference"
    leftovers = [p.name for p in (interrupted / "checkpoints").iterdir() if "tmp" in p.name]
    assert not leftovers, leftovers

    arrays, meta = _final_arrays(interrupted)
    expected, expected_meta = _final_arrays(reference)
    assert arrays.keys() == expected.keys()
    for group in ("params/", "ema_params/", "batch_stats/", "ema_batch_stats/", "opt_state/"):
        assert any(k.startswith(group) for k in arrays), group
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)
    assert int(arrays["step"]) == EPOCHS * STEPS_PER_EPOCH
    assert int(arrays["queue_ptr"]) == (EPOCHS * STEPS_PER_EPOCH * 64) % 96
    assert meta["fingerprint"] == expected_meta["fingerprint"]

    logged = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").open()]
    assert len(logged) == len(set(logged))  # records after the checkpoint were rewound
    steps = _records(interrupted / "metrics.jsonl", "step", drop="images_per_sec")
    assert sorted(steps) == list(range(2, EPOCHS * STEPS_PER_EPOCH + 1, 2))
    assert steps == _records(reference / "metrics.jsonl", "step", drop="images_per_sec")
    epochs = _records(interrupted / "epochs.jsonl", "epoch", drop="knn_seconds")
    assert sorted(epochs) == [1, 2]
    assert epochs == _records(reference / "epochs.jsonl", "epoch", drop="knn_seconds")
    for name in ("summary.json", "baselines.json"):
        assert (interrupted / name).read_text() == (reference / name).read_text(), name


def test_nan_loss_stops_with_one_line_and_the_last_good_checkpoint_intact(runs):
    result, workdir = runs["nan"], runs["root"] / "nan"
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: training diverged: NaN/inf by step 6 (epoch_loss_sum = nan")
    assert "latest good checkpoint: step 4" in last_line and "Lower optim.base_lr" in last_line
    assert "Traceback" not in result.stderr
    # The NaN state (after step 5 or 6) never reached the disk; step 4 reads back as written.
    assert _steps_on_disk(workdir) == [2, 4]
    arrays, meta = _checkpoint(workdir, 4)
    finite, fingerprint = summarize(arrays)
    assert all(finite.values())
    assert fingerprint == meta["fingerprint"]
    assert int(arrays["step"]) == 4
