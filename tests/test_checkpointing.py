"""Checkpoints on their own: exact round trip, damage and fallback, other configs, init_from,
retention, NaN states, SIGTERM and a full disk (one tiny state, no training)."""

import contextlib
import os
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest
from etils import epath

from moco_jax import checkpoint_format, checkpointing
from moco_jax.checkpointing import Checkpointer, CheckpointError, TrainingDiverged
from moco_jax.fingerprint import summarize
from moco_jax.init_from import load_encoder_weights
from moco_jax.validation import ConfigError
from tiny import build, setup, tiny_config


def _config(**overrides):
    """smoke.py with the MLP backbone: few arrays, so saves and restores take little time."""
    return tiny_config(**{"checkpoint.every_steps": 1, "model.backbone": "mlp", **overrides})


@pytest.fixture(scope="module")
def tiny():
    config = _config()
    _, state = build(config, 8)
    return config, state


def _with_step(state, step):
    """A distinct state per step (so a fallback to the wrong step would show)."""
    return state.replace(
        step=state.step + step, queue=state.queue * (1.0 + step), queue_ptr=state.queue_ptr + step
    )


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def pristine(tiny, tmp_path_factory):
    """Checkpoints of steps 1, 2, 3 (saved once; tests damage copies)."""
    config, state = tiny
    directory = tmp_path_factory.mktemp("pristine") / "checkpoints"
    checkpointer = Checkpointer(directory, config)
    for step in (1, 2, 3):
        extra = {"epoch_loss_sum": np.float32(step + 0.25)}
        assert checkpointer.save(step, _with_step(state, step), extra=extra)
    checkpointer.close()
    return directory


def _saved(tmp_path, pristine):
    shutil.copytree(pristine, tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def test_round_trip_is_exact_and_keeps_the_trainer_scalars(tmp_path, tiny, pristine):
    config, state = tiny
    checkpointer = Checkpointer(_saved(tmp_path, pristine), config)
    restored = checkpointer.restore_latest(state)
    checkpointer.close()
    assert checkpointer.restored_step == 3
    assert checkpointer.restored_extra == {"epoch_loss_sum": 3.25}
    _leaves_equal(restored, _with_step(state, 3))  # params, EMA, BN, optimizer, queue, rng
    _leaves_equal(checkpointer.restore(1, state), _with_step(state, 1))


def _largest_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_a_byte(step_dir):
    path = _largest_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(step_dir):
    path = _largest_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def _break_meta(step_dir):
    """The step's metadata (orbax's file, holding the config and checksums) cut short."""
    os.truncate(step_dir / "_CHECKPOINT_METADATA", 5)


def _remove_array_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()
    (step_dir / "state" / "manifest.ocdbt").unlink()


# Orbax leaves its read coroutines of a damaged array un-awaited (harmless, reported at collection).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage,reason",
    [
        (_flip_a_byte, "differ from what was saved"),
        (_truncate, "cannot be read"),
        (_break_meta, "metadata cannot be read"),
        (_remove_array_metadata, "cannot be read"),
    ],
)
def test_damaged_latest_checkpoint_falls_back_with_a_warning(
    tmp_path, tiny, pristine, damage, reason, caplog
):
    config, state = tiny
    directory = _saved(tmp_path, pristine)
    damage(directory / "3")
    checkpointer = Checkpointer(directory, config)
    with caplog.at_level("WARNING"):
        restored = checkpointer.restore_latest(state)
    assert checkpointer.restored_step == 2
    _leaves_equal(restored, _with_step(state, 2))
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "skipped damaged checkpoint step 3" in warning and reason in warning
    assert str(tmp_path / "checkpoints_damaged" / "3") in warning
    assert (tmp_path / "checkpoints_damaged" / "3").is_dir()  # kept for inspection, out of the way
    # Training goes on from step 2 and saves step 3 again.
    assert checkpointer.save(3, _with_step(state, 3))
    checkpointer.close()
    again = Checkpointer(directory, config)
    _leaves_equal(again.restore_latest(state), _with_step(state, 3))
    again.close()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, tiny, pristine):
    config, state = tiny
    directory = _saved(tmp_path, pristine)
    _flip_a_byte(directory / "1")
    _break_meta(directory / "2")
    _truncate(directory / "3")
    checkpointer = Checkpointer(directory, config)
    with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged \(step 3: .*step 1"):
        checkpointer.restore_latest(state)
    checkpointer.close()
    assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["1", "2", "3"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"moco.queue_size": 128}, r"moco.queue_size 96 -> 128"),
        ({"model.dim": 64}, r"model.dim 128 -> 64"),
        (
            {"model.backbone": "resnet18", "model.width_multiplier": 0.125},
            r"model.backbone 'mlp' -> 'resnet18', model.width_multiplier 0.0625 -> 0.125",
        ),
        ({"model.head": "mlp"}, r"model.head 'linear' -> 'mlp'"),
        # The data order and the epochs' boundaries: refused, not silently mis-averaged.
        ({"batch_size": 32}, r"batch_size 64 -> 32"),
        ({"dataset.max_train_examples": 256}, r"dataset.max_train_examples 512 -> 256"),
    ],
)
def test_checkpoint_of_another_config_is_refused_naming_the_fields(
    tmp_path, tiny, pristine, overrides, message
):
    config, state = tiny
    directory = _saved(tmp_path, pristine)
    other = _config(**overrides)
    checkpointer = Checkpointer(directory, other)
    with pytest.raises(ConfigError, match=message) as raised:
        checkpointer.restore_latest(state)
    checkpointer.close()
    assert "saved with a different config" in str(raised.value)
    assert "init_from" in str(raised.value)
    assert (directory / "3").is_dir()  # a refused checkpoint is not treated as damaged


def test_checkpoints_written_before_meta_existed_still_resume(tmp_path, tiny):
    """Older workdirs hold the state alone (one ``default`` item): resumed, then continued."""
    import orbax.checkpoint as ocp

    config, state = tiny
    legacy = ocp.CheckpointManager(tmp_path / "checkpoints")
    legacy.save(1, args=ocp.args.StandardSave(_with_step(state, 1)))
    legacy.close()
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    _leaves_equal(checkpointer.restore_latest(state), _with_step(state, 1))
    assert checkpointer.restored_extra == {}
    assert checkpointer.save(2, _with_step(state, 2))
    checkpointer.close()
    again = Checkpointer(tmp_path / "checkpoints", config)
    _leaves_equal(again.restore_latest(state), _with_step(state, 2))
    again.close()
    other = _config(**{"moco.queue_size": 128})  # no saved config: the shapes tell
    with pytest.raises(ConfigError, match=r"other shapes .*queue \[96, 128\] \(checkpoint\)"):
        Checkpointer(tmp_path / "checkpoints", other).restore(1, _template(other))


def test_checkpoints_of_the_previous_format_still_resume(tmp_path, tiny):
    """The previous release wrote ``state`` beside a ``meta`` JSON item (config, checksums,
    extra) instead of orbax's step metadata and an ``extra`` item."""
    import orbax.checkpoint as ocp

    from moco_jax.compatibility import config_dict

    config, state = tiny
    saved = _with_step(state, 1)
    meta = {
        "format": 1,
        "step": 1,
        "config": config_dict(config),
        "fingerprint": summarize(saved)[1],
        "extra": {"epoch_loss_sum": 1.25},
    }
    previous = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "meta"))
    items = {"state": ocp.args.PyTreeSave(saved), "meta": ocp.args.JsonSave(meta)}
    previous.save(1, args=ocp.args.Composite(**items))
    previous.close()
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    _leaves_equal(checkpointer.restore_latest(state), saved)
    assert checkpointer.restored_extra == {"epoch_loss_sum": 1.25}
    checkpointer.close()
    other = _config(**{"moco.queue_size": 128})  # its saved config is still compared
    with pytest.raises(ConfigError, match=r"moco.queue_size 96 -> 128"):
        Checkpointer(tmp_path / "checkpoints", other).restore_latest(_template(other))


def test_other_settings_may_change_on_resume_with_a_warning(tmp_path, tiny, pristine, caplog):
    config, state = tiny
    directory = _saved(tmp_path, pristine)
    longer = _config(**{"epochs": 3, "optim.base_lr": 0.06})
    checkpointer = Checkpointer(directory, longer)
    with caplog.at_level("WARNING"):
        checkpointer.restore_latest(state)
    checkpointer.close()
    assert checkpointer.restored_step == 3
    assert "epochs 1 -> 3" in caplog.text and "optim.base_lr 0.03 -> 0.06" in caplog.text


def _template(config):
    """A zero state of ``config``'s shapes on 8 devices (traced, not compiled: fast)."""
    from jax.sharding import NamedSharding, PartitionSpec

    built = setup(config, 8)
    shapes = built.abstract_state()
    zeros = jax.tree.map(
        lambda s: (
            jax.random.key(0)
            if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key)
            else np.zeros(s.shape, s.dtype)
        ),
        shapes,
    )
    return jax.device_put(zeros, NamedSharding(built.mesh, PartitionSpec()))


def test_init_from_takes_the_encoder_only(tmp_path, tiny, pristine):
    config, state = tiny
    _saved(tmp_path, pristine)
    saved = _with_step(state, 3)
    # Another K and dim: the backbone comes over, the head (other shape) and the rest stay fresh.
    other = _config(**{"moco.queue_size": 128, "model.dim": 32})
    fresh = _template(other)
    started = load_encoder_weights(str(tmp_path), fresh, setup(other, 8))
    for tree in (started.params, started.ema_params):
        _leaves_equal(tree["backbone"], saved.params["backbone"])
    _leaves_equal(started.batch_stats["backbone"], saved.batch_stats["backbone"])
    _leaves_equal(started.ema_batch_stats["backbone"], saved.batch_stats["backbone"])
    _leaves_equal(started.params["head"], fresh.params["head"])
    assert started.queue.shape == (128, 32) and int(started.step) == 0
    _leaves_equal(started.opt_state, fresh.opt_state)

    # Same head shapes: the head comes over too (a step directory works as the path as well).
    same_head = _config(**{"moco.queue_size": 128})
    started = load_encoder_weights(
        str(tmp_path / "checkpoints" / "2"), _template(same_head), setup(same_head, 8)
    )
    _leaves_equal(started.params, _with_step(state, 2).params)

    wider = _config(**{"model.width_multiplier": 0.125})
    with pytest.raises(
        ConfigError, match=r"init_from checkpoint .*model.width_multiplier 0.0625 -> 0.125"
    ):
        load_encoder_weights(str(tmp_path), _template(wider), setup(wider, 8))
    with pytest.raises(ConfigError, match="init_from: .* does not exist"):
        load_encoder_weights(str(tmp_path / "nowhere"), state, setup(config, 8))


def test_keeps_the_last_few_and_every_nth(tmp_path, tiny):
    _, state = tiny
    config = _config(**{"checkpoint.keep": 1, "checkpoint.keep_every_steps": 2})
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    for step in range(1, 6):
        checkpointer.save(step, state)
    checkpointer.close()
    assert checkpointer.manager.all_steps() == [2, 4, 5]


def test_a_non_finite_state_is_never_saved(tmp_path, tiny):
    config, state = tiny
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    assert checkpointer.save(1, state, extra={"epoch_loss_sum": 2.0})
    poisoned = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    with pytest.raises(
        TrainingDiverged, match=r"NaN/inf by step 2 .*latest good checkpoint: step 1"
    ):
        checkpointer.save(2, poisoned, extra={"epoch_loss_sum": 2.0})
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    with pytest.raises(TrainingDiverged, match=r"epoch_loss_sum = nan"):
        checkpointer.save(3, state, extra={"epoch_loss_sum": float("nan")})
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    assert checkpointer.manager.all_steps() == [1]
    restored = checkpointer.restore_latest(state)
    checkpointer.close()
    assert all(summarize(restored)[0].values())


def test_sigterm_is_turned_into_a_save_request(tmp_path, tiny):
    config, state = tiny
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    previous = signal.getsignal(signal.SIGTERM)
    checkpointer.watch_sigterm()
    assert not checkpointer.reached_preemption(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpointer.reached_preemption(2)
    with pytest.raises(checkpointing.Preempted, match="SIGTERM: saved step 2"):
        checkpointer.stop_for_preemption(2, state, {"epoch_loss_sum": 0.5})
    assert signal.getsignal(signal.SIGTERM) == previous  # handler given back
    assert Checkpointer(tmp_path / "checkpoints", config).latest_step() == 2


def test_a_full_disk_fails_before_training(tmp_path, tiny, monkeypatch):
    config, state = tiny
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    checkpointer.check_can_save(state)  # plenty of room here
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(OSError, match=r"has 0.0 MiB free but one checkpoint needs about"):
        checkpointer.check_can_save(state)
    with pytest.raises(OSError, match=r"keeps up to 4 at once \(checkpoint.keep=3, plus one"):
        checkpointer.check_can_save(state)
    checkpointer.close()


def test_a_disk_that_fills_mid_run_is_one_line_and_loses_nothing(tmp_path, tiny):
    """A real full disk (a 3 MiB tmpfs): the failed write is reported with what the run needs,
    the checkpoint before it stays intact and, once there is room, saving goes on."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        config, state = tiny
        checkpointer = Checkpointer(mount / "checkpoints", config)
        checkpointer.save(1, _with_step(state, 1))
        checkpointer.manager.wait_until_finished()
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(filler, bytes(1 << 16))
        os.close(filler)
        with pytest.raises(OSError, match=r"no space left on device in .* one needs about"):
            checkpointer.save(2, _with_step(state, 2))  # the write fails in the background
            checkpointer.close()
        os.remove(mount / "filler")
        again = Checkpointer(mount / "checkpoints", config)
        _leaves_equal(again.restore_latest(state), _with_step(state, 1))
        assert again.save(2, _with_step(state, 2))
        again.close()
        assert again.manager.all_steps() == [1, 2]
    finally:
        subprocess.run(["umount", str(mount)])


def _unreadable_and_stuck(monkeypatch, directory, stuck):
    """Step ``stuck`` can be neither read, moved nor deleted, as a step directory without
    permissions is for a user (checked by hand as an unprivileged user; here, as root, the
    refusals are simulated)."""
    path_type = type(epath.Path(directory))
    real_read_meta, real_rename, real_rmtree = (
        checkpoint_format.read_meta,
        path_type.rename,
        path_type.rmtree,
    )

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    def read_meta(manager, step):
        if step == stuck:
            refuse(directory / str(step))
        return real_read_meta(manager, step)

    def rename(self, target):
        return refuse(self) if self.name == str(stuck) else real_rename(self, target)

    def rmtree(self, missing_ok=False):
        return refuse(self) if self.name == str(stuck) else real_rmtree(self, missing_ok)

    monkeypatch.setattr(checkpoint_format, "read_meta", read_meta)
    monkeypatch.setattr(path_type, "rename", rename)
    monkeypatch.setattr(path_type, "rmtree", rmtree)


def test_an_unreadable_checkpoint_that_cannot_be_moved_is_skipped(
    tmp_path, tiny, pristine, monkeypatch, caplog
):
    config, state = tiny
    directory = _saved(tmp_path, pristine)
    _unreadable_and_stuck(monkeypatch, directory, 3)
    checkpointer = Checkpointer(directory, config)
    with caplog.at_level("WARNING"):
        restored = checkpointer.restore_latest(state)
    checkpointer.close()
    assert checkpointer.restored_step == 2
    _leaves_equal(restored, _with_step(state, 2))
    assert "skipped damaged checkpoint step 3" in caplog.text
    assert "it stays in place: it cannot be moved (PermissionError" in caplog.text


def test_retention_keeps_the_resumed_checkpoint_while_a_newer_one_is_unreadable(
    tmp_path, tiny, pristine, monkeypatch, caplog
):
    """Step 3 is unreadable and stuck in place; the run resumes from 2. ``keep`` counts readable
    checkpoints only: 2 stays until two newer ones are written and 3 is left alone (it was
    counted as kept, so 1 and 2 went at once). A later run, which does not know 3 is unreadable,
    fails to delete it: a warning, where orbax's error stopped every rerun one save later."""
    config, state = tiny
    directory = _saved(tmp_path, pristine)
    _unreadable_and_stuck(monkeypatch, directory, 3)
    keep_two = _config(**{"checkpoint.keep": 2})

    def steps():
        return sorted(int(p.name) for p in directory.iterdir())

    checkpointer = Checkpointer(directory, keep_two)
    checkpointer.restore_latest(state)
    assert checkpointer.restored_step == 2
    assert checkpointer.save(4, _with_step(state, 4))
    checkpointer.manager.wait_until_finished()
    assert steps() == [2, 3, 4]
    assert checkpointer.save(5, _with_step(state, 5))
    checkpointer.close()
    assert steps() == [3, 4, 5]

    later = Checkpointer(directory, keep_two)
    _leaves_equal(later.restore_latest(state), _with_step(state, 5))
    with caplog.at_level("WARNING"):
        assert later.save(6, _with_step(state, 6))
        assert later.save(7, _with_step(state, 7))
        later.close()
    assert steps() == [3, 6, 7]
    assert "could not delete old checkpoint step 3 (PermissionError" in caplog.text
