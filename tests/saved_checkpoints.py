"""Checkpoints of one tiny state, saved once per test module, and ways to damage a saved step
(shared by test_checkpointing and test_checkpoint_damage)."""

import os
import shutil

import jax
import numpy as np

from moco_jax.run.checkpointing import Checkpointer
from tiny import build, tiny_config


def config_of(**overrides):
    """smoke.py with the MLP backbone: few arrays, so saves and restores take little time."""
    return tiny_config(**{"checkpoint.every_steps": 1, "model.backbone": "mlp", **overrides})


def make_tiny():
    config = config_of()
    _, state = build(config, 8)
    return config, state


def with_step(state, step):
    """A distinct state per step (so a fallback to the wrong step would show)."""
    return state.replace(
        step=state.step + step, queue=state.queue * (1.0 + step), queue_ptr=state.queue_ptr + step
    )


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def make_pristine(tiny, tmp_path_factory):
    """Checkpoints of steps 1, 2, 3 (saved once; tests damage copies)."""
    config, state = tiny
    directory = tmp_path_factory.mktemp("pristine") / "checkpoints"
    checkpointer = Checkpointer(directory, config)
    for step in (1, 2, 3):
        extra = {"epoch_loss_sum": np.float32(step + 0.25)}
        assert checkpointer.save(step, with_step(state, step), extra=extra)
    checkpointer.close()
    return directory


def saved_copy(tmp_path, pristine):
    shutil.copytree(pristine, tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def largest_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def flip_a_byte(step_dir):
    path = largest_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(step_dir):
    path = largest_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def break_meta(step_dir):
    """The step's metadata (orbax's file, holding the config and checksums) cut short."""
    os.truncate(step_dir / "_CHECKPOINT_METADATA", 5)


def remove_array_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()
    (step_dir / "state" / "manifest.ocdbt").unlink()
