"""Tiny configs and inputs shared by the step tests (small enough to compile in seconds)."""

import numpy as np

from configs import smoke
from moco_jax.engine import build_engine
from moco_jax.mesh import make_data_mesh, shard_batch


def tiny_config(**overrides):
    """smoke.py with dotted-name overrides, e.g. ``tiny_config(**{"moco.momentum": 0.5})``."""
    config = smoke.get_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def build(config, num_devices, steps_per_epoch=2):
    mesh = make_data_mesh(num_devices)
    engine = build_engine(config, mesh, steps_per_epoch)
    size, channels = config.dataset.image_size, config.dataset.num_channels
    state = engine.init_state(jax_key(config.seed), (size, size, channels), config.moco.queue_size)
    return engine, state


def jax_key(seed):
    import jax

    return jax.random.key(seed)


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


def run_steps(engine, state, batches):
    """Run the step over ``batches``; returns the final state and the list of metrics."""
    history = []
    for images_q, images_k in batches:
        state, metrics = engine.train_step(
            state, shard_batch(engine.mesh, images_q), shard_batch(engine.mesh, images_k)
        )
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history
