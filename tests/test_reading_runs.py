"""Reading another run's workdir (export, ``init_from`` / ``linear.pretrained``, ``evaluate knn``)
never changes it: the newest intact checkpoint with a warning naming a damaged newer one, one
error naming the workdir when none is intact, and a step deleted while it is read (the run is
still saving; its retention deleted it) taken for what it is, not for damage.

One tiny saved run (smoke.py's ResNet, steps 2, 4 and 6 of distinct states, no training); each
test damages or deletes in a copy of it (``evaluate knn`` in one of the MLP backbone, made alike).
"""

import asyncio
import gc
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from abstract_states import abstract_state
from etils import epath

import moco_jax
from moco_jax import ConfigError, export
from moco_jax.interop.init_from import load_encoder_weights
from moco_jax.run import checkpoint_format, cli_errors
from moco_jax.run.checkpointing import Checkpointer, CheckpointError
from tiny import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = (2, 4, 6)


def _state_of(setup, step):
    """A state of random arrays, distinct per step (so reading the wrong step shows), made from
    the state's shapes (nothing to compile)."""
    rng = np.random.default_rng(step)

    def fill(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(step), x.sharding)
        values = rng.uniform(0.5, 1.5, x.shape) if x.shape else np.full((), step)
        return jax.device_put(values.astype(x.dtype), x.sharding)

    return jax.tree.map(fill, abstract_state(setup))  # traced once


def _save_run(workdir, config):
    """config.json and checkpoints of ``STEPS`` (distinct random states) in ``workdir``; the
    set-up they were made with."""
    setup = moco_jax.build(config, 8, devices=jax.devices()[:1])
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(epath.Path(workdir) / "checkpoints", config)
    for step in STEPS:
        extra = {"epoch_loss_sum": 0.0, "steps_per_epoch": 8}  # smoke.py: 512 / 64
        checkpointer.save(step, _state_of(setup, step), force=True, extra=extra)
    checkpointer.close()
    return setup


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(workdir, setup)`` of a saved smoke.py run (its ResNet: export reads it)."""
    workdir = tmp_path_factory.mktemp("saved") / "run"
    return workdir, _save_run(workdir, tiny_config())


@pytest.fixture
def workdir(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def mlp_workdir(tmp_path):
    """A saved run as ``workdir``'s with the MLP backbone on the stored 28x28 images and as many
    test images as training ones: ``evaluate knn`` compiles its initialisation and features
    (once: one shape) in seconds, the ResNet's in tens of seconds."""
    overrides = {"model.backbone": "mlp", "model.width_multiplier": 0.25}
    overrides |= {"dataset.image_size": 28, "dataset.max_test_examples": 512}
    _save_run(tmp_path / "run", tiny_config(**overrides))
    return tmp_path / "run"


def _tree(path):
    """Every file and directory under ``path`` (itself included): size and modification time."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in [path, *path.rglob("*")]
    }


def _truncate_arrays(step_dir):
    """Every data file of the step's arrays cut to half (whichever holds the backbone)."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            os.truncate(path, path.stat().st_size // 2)


def _backbone(state):
    return jax.device_get({"params": state.params["backbone"], "bs": state.batch_stats["backbone"]})


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _load(workdir, setup):
    """The encoder of ``workdir`` loaded into a fresh state, as linear evaluation loads it."""
    return load_encoder_weights(str(workdir), _state_of(setup, 0), setup, "linear.pretrained")


# Orbax leaves its read coroutines of a damaged array un-awaited (harmless, reported at collection).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pretrained_weights_come_from_the_newest_intact_checkpoint(saved, workdir, caplog):
    _, setup = saved
    _truncate_arrays(workdir / "checkpoints" / "6")
    before = _tree(workdir)
    with caplog.at_level("WARNING"):
        loaded = _load(workdir, setup)
    _assert_same(_backbone(loaded), _backbone(_state_of(setup, 4)))
    assert "skipped damaged checkpoint step 6 of" in caplog.text
    assert "left in place. Reading step 4" in caplog.text
    assert _tree(workdir) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_pretrained_workdir_without_an_intact_checkpoint_is_one_error(saved, workdir):
    _, setup = saved
    for step in STEPS:
        _truncate_arrays(workdir / "checkpoints" / str(step))
    before = _tree(workdir)
    with pytest.raises(CheckpointError) as error:
        _load(workdir, setup)
    message = str(error.value)
    assert message.startswith(
        f"linear.pretrained {workdir}: every checkpoint in {workdir}/checkpoints is damaged (step 6"
    )
    assert "nothing there was changed" in message and "Move the directory" not in message
    assert "\n" not in message
    assert _tree(workdir) == before


def _edit_checksum(step_dir, name):
    """The checksum the step saved for array ``name`` changed: that array reads back other."""
    path = step_dir / "_CHECKPOINT_METADATA"
    metadata = json.loads(path.read_text())
    checks = metadata["custom_metadata"]["fingerprint"][name]
    checks[0] = (checks[0] + 1) % 2**32
    path.write_text(json.dumps(metadata))


def test_the_arrays_read_are_checked_against_their_checksums(saved, workdir, caplog):
    """Only the encoder is read: its arrays are verified, the others (the queue) not needed."""
    _, setup = saved
    names = json.loads((workdir / "checkpoints/6/_CHECKPOINT_METADATA").read_text())
    kernel = next(n for n in names["custom_metadata"]["fingerprint"] if "params/backbone" in n)
    _edit_checksum(workdir / "checkpoints" / "6", "queue")
    _assert_same(_backbone(_load(workdir, setup)), _backbone(_state_of(setup, 6)))
    _edit_checksum(workdir / "checkpoints" / "6", kernel)
    with caplog.at_level("WARNING"):
        loaded = _load(workdir, setup)
    _assert_same(_backbone(loaded), _backbone(_state_of(setup, 4)))
    expected = f"step 6 of {workdir}/checkpoints (1 array(s) differ from what was saved, e.g. "
    assert f"{expected}{kernel})" in caplog.text


def _run_export(workdir, output, before=""):
    """``python -m moco_jax.export`` (detectron2: no torch needed), ``before`` run first."""
    args = [f"--workdir={workdir}", "--format=detectron2", f"--output={output}"]
    code = f"import runpy, sys, warnings\n{before}\nsys.argv = ['export', *{args!r}]\n"
    # ``before`` may have imported moco_jax.export: runpy's warning about it is not the test's.
    code += "warnings.filterwarnings('ignore', '.*moco_jax.export', RuntimeWarning)\n"
    code += "runpy.run_module('moco_jax.export', run_name='__main__')"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


def test_export_of_a_workdir_without_an_intact_checkpoint_is_only_the_error_line(workdir, tmp_path):
    for step in STEPS:
        _truncate_arrays(workdir / "checkpoints" / str(step))
    before = _tree(workdir)
    result = _run_export(workdir, tmp_path / "x.pkl")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: every checkpoint in {workdir}/checkpoints is damaged")
    assert result.stderr.count("\n") == 1, result.stderr  # no traceback before or after
    assert "Move the directory" not in result.stderr
    assert _tree(workdir) == before and not (tmp_path / "x.pkl").exists()


def _asyncio_records(make_noise):
    """What asyncio logs while ``make_noise(loop)`` runs in an event loop and is collected (the
    earlier tests' abandoned futures collected first)."""
    gc.collect()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("asyncio")
    # A CLI run in this process before (cli_errors.fail) may have silenced the logger for good.
    disabled, logger.disabled = logger.disabled, False
    logger.addHandler(handler)
    try:

        async def main():
            make_noise(asyncio.get_running_loop())
            gc.collect()

        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
        logger.disabled = disabled
    return records


def test_an_abandoned_failed_future_prints_nothing_before_the_error_line():
    """Orbax reads a damaged checkpoint through futures that fail together; the ones it does not
    await are logged by asyncio whenever they are collected (once before the error line: a
    flaky test above). The CLIs' log filter drops those records, and only those."""

    def abandoned(loop):
        loop.create_future().set_exception(ValueError("Error opening OCDBT database"))

    def failing_callback(loop):
        loop.call_soon(lambda: 1 / 0)

    [unretrieved] = _asyncio_records(abandoned)
    assert unretrieved.getMessage().startswith("Future exception was never retrieved")
    assert not cli_errors._not_orbax_noise(unretrieved)
    [other] = _asyncio_records(failing_callback)
    assert cli_errors._not_orbax_noise(other)


def delete_as_read(saves_newer):
    """What a run saving every few steps does to a reader: as a step is read, its retention
    deletes it (once it saved step 8, with ``saves_newer``)."""
    real_read_meta = checkpoint_format.read_meta

    def read_meta(manager, step):
        if step != 8:
            where = manager.directory / str(step)
            if saves_newer:
                shutil.copytree(where, manager.directory / "8")
            shutil.rmtree(where)
        return real_read_meta(manager, step)

    checkpoint_format.read_meta = read_meta


def test_export_reads_the_newest_step_left_when_a_run_deletes_the_one_read(
    workdir, tmp_path, monkeypatch
):
    """Step 6 is deleted as it is read, once step 8 is saved: step 8 is exported."""
    monkeypatch.setattr(checkpoint_format, "read_meta", checkpoint_format.read_meta)  # restored
    delete_as_read(saves_newer=True)
    result = export.export_weights(str(workdir), "detectron2", str(tmp_path / "x.pkl"))
    assert result["step"] == 8
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "8"]


def test_checkpoints_all_deleted_while_read_are_not_called_damaged(workdir, tmp_path):
    patch = "from test_reading_runs import delete_as_read; delete_as_read(saves_newer=False)"
    result = _run_export(workdir, tmp_path / "x.pkl", patch)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: the checkpoints of {workdir}/checkpoints were deleted while being read (steps 6, "
        f"4, 2): is a run still saving there and deleting older ones (checkpoint.keep)? Rerun, or "
        f"read a step it keeps for good (checkpoint.keep_every_steps)\n"
    )


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_evaluate_knn_beside_a_training_run_reads_and_changes_nothing(mlp_workdir, caplog):
    """``evaluate knn`` on a workdir whose run holds the lock (training): it reads the newest
    intact checkpoint, leaves a damaged one where it is, takes the run's baselines.json as they
    are, and writes only its own result file (``knn_eval/step_N.json``)."""
    from data_fixtures import fashion_mnist_data_dir

    from moco_jax.evaluate import evaluate_knn
    from moco_jax.run.workdir_lock import WorkdirLock

    data_dir, workdir = fashion_mnist_data_dir(), mlp_workdir
    _truncate_arrays(workdir / "checkpoints" / "6")
    baselines = {"knn_pixels": 12.5, "random_init_knn_head": 25.0, "random_init_knn_backbone": 5}
    (workdir / "baselines.json").write_text(json.dumps(baselines))
    with WorkdirLock(workdir), caplog.at_level("WARNING"):  # as the training run holds it
        before = _tree(workdir)
        result = evaluate_knn(str(workdir), data_dir=data_dir)
    assert result["step"] == 4
    assert {key: result[key] for key in baselines} == baselines  # read, not computed again
    assert 0 <= result["knn_head"] <= 100 and 0 <= result["knn_backbone"] <= 100
    assert "skipped damaged checkpoint step 6 of" in caplog.text
    output = workdir / "knn_eval" / "step_4.json"
    assert result["output"] == str(output)
    assert json.loads(output.read_text()) == {k: v for k, v in result.items() if k != "output"}
    after = _tree(workdir)
    assert {name for name in after if not name.startswith("knn_eval")} == set(before)
    assert {name: after[name] for name in before if name != "."} == {
        name: before[name] for name in before if name != "."
    }  # the workdir's own entry changed: knn_eval/ was added
    assert not (workdir / "checkpoints_damaged").exists()


# Fields added to the config after the first runs were saved: their config.json lacks them.
NEWER_FIELDS = {
    "": ("algorithm", "ordered_reductions"),
    "optim": ("name", "betas", "warmup_epochs"),
    "moco": ("symmetric", "momentum_cosine"),
    "model": ("mlp_dim", "zero_init_residual", "stop_grad_conv1"),
    "checkpoint": ("keep_every_steps",),
}


def test_a_run_saved_before_newer_fields_reads_with_their_defaults(workdir, tmp_path):
    """``load_run_config`` merges config.json onto ``base_config()`` once: an older run's missing
    fields read as the defaults its code assumed, and a fork's own keys are kept."""
    from moco_jax.config.defaults import base_config
    from moco_jax.run.saved_run import load_run_config

    path = workdir / "config.json"
    saved = json.loads(path.read_text())
    for section, fields in NEWER_FIELDS.items():
        for field in fields:
            del (saved[section] if section else saved)[field]
    saved["fork"] = {"rate": 3}
    saved["model"]["fork_layers"] = 2
    path.write_text(json.dumps(saved))
    config, defaults = load_run_config(workdir), base_config()
    for section, fields in NEWER_FIELDS.items():
        for field in fields:
            read = config[section][field] if section else config[field]
            assert read == (defaults[section][field] if section else defaults[field])
    assert config.fork.rate == 3 and config.model.fork_layers == 2
    assert config.dataset.mean == tuple(saved["dataset"]["mean"])  # its own values
    result = export.export_weights(str(workdir), "detectron2", str(tmp_path / "x.pkl"))
    assert result["step"] == 6


def test_a_saved_value_of_another_type_is_one_error_naming_file_and_field(workdir):
    """ml_collections checks each saved value's type as it checks a command-line override."""
    from moco_jax.run.saved_run import load_run_config

    path = workdir / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "init_from": 3}))
    with pytest.raises(ConfigError, match=rf"^{path}: init_from must be of type str, got 3$"):
        load_run_config(workdir)
    saved["knn"]["k"] = 2.5
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=rf"^{path}: knn.k must be of type int, got 2.5$"):
        load_run_config(workdir)
