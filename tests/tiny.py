"""Tiny configs and inputs shared by the step tests (small enough to compile in seconds)."""

import numpy as np

import moco_jax
from configs import smoke
from moco_jax.mesh import shard_batch


def set_fields(config, overrides):
    """``config`` with dotted-name overrides, e.g. ``{"moco.momentum": 0.5}``."""
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def tiny_config(**overrides):
    """smoke.py with dotted-name overrides, e.g. ``tiny_config(**{"moco.momentum": 0.5})``."""
    return set_fields(smoke.get_config(), overrides)


def setup(config, num_devices, steps_per_epoch=2):
    """``moco_jax.build`` over the first ``num_devices`` devices."""
    import jax

    return moco_jax.build(config, steps_per_epoch, devices=jax.devices()[:num_devices])


def build(config, num_devices, steps_per_epoch=2):
    """The set-up and its initial state."""
    built = setup(config, num_devices, steps_per_epoch)
    return built, built.initial_state()


def image_batches(config, steps, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.batch_size, config.dataset.image_size, config.dataset.image_size)
    shape = (*shape, config.dataset.num_channels)
    return [
        (
            rng.standard_normal(shape).astype(np.float32),
            rng.standard_normal(shape).astype(np.float32),
        )
        for _ in range(steps)
    ]


def run_steps(setup, state, batches):
    """Run the step over ``batches``; returns the final state and the list of metrics."""
    history = []
    for images_q, images_k in batches:
        state, metrics = setup.algorithm.train_step(
            state, shard_batch(setup.mesh, images_q), shard_batch(setup.mesh, images_k)
        )
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history
