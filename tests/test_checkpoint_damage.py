"""Damaged and unreadable checkpoints of a run's own workdir: fallback to the newest intact one,
set aside or left in place, and retention that never deletes the one the run resumed from."""

import pytest
from etils import epath
from saved_checkpoints import (
    break_meta,
    config_of,
    flip_a_byte,
    leaves_equal,
    make_pristine,
    make_tiny,
    remove_array_metadata,
    saved_copy,
    truncate,
    with_step,
)

from moco_jax.run import checkpoint_format
from moco_jax.run.checkpointing import Checkpointer, CheckpointError

tiny = pytest.fixture(scope="module")(make_tiny)
pristine = pytest.fixture(scope="module")(make_pristine)


# Orbax leaves its read coroutines of a damaged array un-awaited (harmless, reported at collection).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage,reason",
    [
        (flip_a_byte, "differ from what was saved"),
        (truncate, "cannot be read"),
        (break_meta, "metadata cannot be read"),
        (remove_array_metadata, "cannot be read"),
    ],
)
def test_damaged_latest_checkpoint_falls_back_with_a_warning(
    tmp_path, tiny, pristine, damage, reason, caplog
):
    config, state = tiny
    directory = saved_copy(tmp_path, pristine)
    damage(directory / "3")
    checkpointer = Checkpointer(directory, config)
    with caplog.at_level("WARNING"):
        restored = checkpointer.restore_latest(state)
    assert checkpointer.restored_step == 2
    leaves_equal(restored, with_step(state, 2))
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "skipped damaged checkpoint step 3" in warning and reason in warning
    assert str(tmp_path / "checkpoints_damaged" / "3") in warning
    assert (tmp_path / "checkpoints_damaged" / "3").is_dir()  # kept for inspection, out of the way
    # Training goes on from step 2 and saves step 3 again.
    assert checkpointer.save(3, with_step(state, 3))
    checkpointer.close()
    again = Checkpointer(directory, config)
    leaves_equal(again.restore_latest(state), with_step(state, 3))
    again.close()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, tiny, pristine):
    config, state = tiny
    directory = saved_copy(tmp_path, pristine)
    flip_a_byte(directory / "1")
    break_meta(directory / "2")
    truncate(directory / "3")
    checkpointer = Checkpointer(directory, config)
    with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged \(step 3: .*step 1"):
        checkpointer.restore_latest(state)
    checkpointer.close()
    assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["1", "2", "3"]


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
    directory = saved_copy(tmp_path, pristine)
    _unreadable_and_stuck(monkeypatch, directory, 3)
    checkpointer = Checkpointer(directory, config)
    with caplog.at_level("WARNING"):
        restored = checkpointer.restore_latest(state)
    checkpointer.close()
    assert checkpointer.restored_step == 2
    leaves_equal(restored, with_step(state, 2))
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
    directory = saved_copy(tmp_path, pristine)
    _unreadable_and_stuck(monkeypatch, directory, 3)
    keep_two = config_of(**{"checkpoint.keep": 2})

    def steps():
        return sorted(int(p.name) for p in directory.iterdir())

    checkpointer = Checkpointer(directory, keep_two)
    checkpointer.restore_latest(state)
    assert checkpointer.restored_step == 2
    assert checkpointer.save(4, with_step(state, 4))
    checkpointer.manager.wait_until_finished()
    assert steps() == [2, 3, 4]
    assert checkpointer.save(5, with_step(state, 5))
    checkpointer.close()
    assert steps() == [3, 4, 5]

    later = Checkpointer(directory, keep_two)
    leaves_equal(later.restore_latest(state), with_step(state, 5))
    with caplog.at_level("WARNING"):
        assert later.save(6, with_step(state, 6))
        assert later.save(7, with_step(state, 7))
        later.close()
    assert steps() == [3, 6, 7]
    assert "could not delete old checkpoint step 3 (PermissionError" in caplog.text
