"""Checkpoints on their own: exact round trip, other configs and formats, init_from,
retention, NaN states, SIGTERM and a full disk (one tiny state, no training)."""

import contextlib
import os
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest
from saved_checkpoints import (
    config_of,
    leaves_equal,
    make_pristine,
    make_tiny,
    saved_copy,
    with_step,
)

from moco_jax.config.checks import ConfigError
from moco_jax.interop.init_from import load_encoder_weights
from moco_jax.run import checkpointing
from moco_jax.run.checkpointing import Checkpointer, TrainingDiverged
from moco_jax.run.fingerprint import summarize
from tiny import setup

tiny = pytest.fixture(scope="module")(make_tiny)
pristine = pytest.fixture(scope="module")(make_pristine)


def test_round_trip_is_exact_and_keeps_the_trainer_scalars(tmp_path, tiny, pristine):
    config, state = tiny
    checkpointer = Checkpointer(saved_copy(tmp_path, pristine), config)
    restored = checkpointer.restore_latest(state)
    checkpointer.close()
    assert checkpointer.restored_step == 3
    assert checkpointer.restored_extra == {"epoch_loss_sum": 3.25}
    leaves_equal(restored, with_step(state, 3))  # params, EMA, BN, optimizer, queue, rng
    leaves_equal(checkpointer.restore(1, state), with_step(state, 1))


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
    directory = saved_copy(tmp_path, pristine)
    other = config_of(**overrides)
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
    legacy.save(1, args=ocp.args.StandardSave(with_step(state, 1)))
    legacy.close()
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    leaves_equal(checkpointer.restore_latest(state), with_step(state, 1))
    assert checkpointer.restored_extra == {}
    assert checkpointer.save(2, with_step(state, 2))
    checkpointer.close()
    again = Checkpointer(tmp_path / "checkpoints", config)
    leaves_equal(again.restore_latest(state), with_step(state, 2))
    again.close()
    other = config_of(**{"moco.queue_size": 128})  # no saved config: the shapes tell
    with pytest.raises(ConfigError, match=r"other shapes .*queue \[96, 128\] \(checkpoint\)"):
        Checkpointer(tmp_path / "checkpoints", other).restore(1, _template(other))


def test_checkpoints_of_the_previous_format_still_resume(tmp_path, tiny):
    """The previous release wrote ``state`` beside a ``meta`` JSON item (config, checksums,
    extra) instead of orbax's step metadata and an ``extra`` item."""
    import orbax.checkpoint as ocp

    from moco_jax.config.compatibility import config_dict

    config, state = tiny
    saved = with_step(state, 1)
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
    leaves_equal(checkpointer.restore_latest(state), saved)
    assert checkpointer.restored_extra == {"epoch_loss_sum": 1.25}
    checkpointer.close()
    other = config_of(**{"moco.queue_size": 128})  # its saved config is still compared
    with pytest.raises(ConfigError, match=r"moco.queue_size 96 -> 128"):
        Checkpointer(tmp_path / "checkpoints", other).restore_latest(_template(other))


def test_other_settings_may_change_on_resume_with_a_warning(tmp_path, tiny, pristine, caplog):
    config, state = tiny
    directory = saved_copy(tmp_path, pristine)
    longer = config_of(**{"epochs": 3, "optim.base_lr": 0.06})
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
    saved_copy(tmp_path, pristine)
    saved = with_step(state, 3)
    # Another K and dim: the backbone comes over, the head (other shape) and the rest stay fresh.
    other = config_of(**{"moco.queue_size": 128, "model.dim": 32})
    fresh = _template(other)
    started = load_encoder_weights(str(tmp_path), fresh, setup(other, 8))
    for tree in (started.params, started.ema_params):
        leaves_equal(tree["backbone"], saved.params["backbone"])
    leaves_equal(started.batch_stats["backbone"], saved.batch_stats["backbone"])
    leaves_equal(started.ema_batch_stats["backbone"], saved.batch_stats["backbone"])
    leaves_equal(started.params["head"], fresh.params["head"])
    assert started.queue.shape == (128, 32) and int(started.step) == 0
    leaves_equal(started.opt_state, fresh.opt_state)

    # Same head shapes: the head comes over too (a step directory works as the path as well).
    same_head = config_of(**{"moco.queue_size": 128})
    started = load_encoder_weights(
        str(tmp_path / "checkpoints" / "2"), _template(same_head), setup(same_head, 8)
    )
    leaves_equal(started.params, with_step(state, 2).params)

    wider = config_of(**{"model.width_multiplier": 0.125})
    with pytest.raises(
        ConfigError, match=r"init_from checkpoint .*model.width_multiplier 0.0625 -> 0.125"
    ):
        load_encoder_weights(str(tmp_path), _template(wider), setup(wider, 8))
    with pytest.raises(ConfigError, match="init_from: .* does not exist"):
        load_encoder_weights(str(tmp_path / "nowhere"), state, setup(config, 8))


def test_keeps_the_last_few_and_every_nth(tmp_path, tiny):
    _, state = tiny
    config = config_of(**{"checkpoint.keep": 1, "checkpoint.keep_every_steps": 2})
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
        checkpointer.save(1, with_step(state, 1))
        checkpointer.manager.wait_until_finished()
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(filler, bytes(1 << 16))
        os.close(filler)
        with pytest.raises(OSError, match=r"no space left on device in .* one needs about"):
            checkpointer.save(2, with_step(state, 2))  # the write fails in the background
            checkpointer.close()
        os.remove(mount / "filler")
        again = Checkpointer(mount / "checkpoints", config)
        leaves_equal(again.restore_latest(state), with_step(state, 1))
        assert again.save(2, with_step(state, 2))
        again.close()
        assert again.manager.all_steps() == [1, 2]
    finally:
        subprocess.run(["umount", str(mount)])
