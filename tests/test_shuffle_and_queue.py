"""Shuffle-BN's all_to_all exchange and the queue's wrap-around, checked against plain NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moco_jax.algorithms.queue import enqueue, init_queue
from moco_jax.algorithms.shuffle_bn import inverse_permutation, shuffle_batch
from moco_jax.mesh import DATA_AXIS, make_data_mesh, shard_batch


def _run_shuffle(num_devices, per_device, seed):
    mesh = make_data_mesh(num_devices)
    # Each "image" is its own global index, so we can see where it travelled.
    images = np.arange(num_devices * per_device, dtype=np.float32).reshape(-1, 1)

    def per_device_fn(x, rng):
        shuffled, unshuffle = shuffle_batch(x, rng, DATA_AXIS, num_devices)
        keys = shuffled * 10.0 + 1.0  # a per-example "key encoder"
        return shuffled, unshuffle(keys)

    fn = jax.jit(
        jax.shard_map(
            per_device_fn,
            mesh=mesh,
            in_specs=(P(DATA_AXIS), P()),
            out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
        )
    )
    shuffled, keys = fn(shard_batch(mesh, images), jax.random.key(seed))
    return images, np.asarray(shuffled), np.asarray(keys)


@pytest.mark.parametrize("num_devices,per_device", [(8, 16), (8, 8), (1, 12)])
def test_shuffle_then_unshuffle_is_identity_on_keys(num_devices, per_device):
    images, shuffled, keys = _run_shuffle(num_devices, per_device, seed=3)
    np.testing.assert_array_equal(keys, images * 10.0 + 1.0)
    # The shuffled global batch is a permutation of the original one.
    np.testing.assert_array_equal(np.sort(shuffled.ravel()), images.ravel())


def test_shuffle_sends_an_equal_share_to_every_device_and_is_random():
    num_devices, per_device = 8, 16
    images, shuffled, _ = _run_shuffle(num_devices, per_device, seed=0)
    source_device = (shuffled.ravel() // per_device).astype(int).reshape(num_devices, per_device)
    for device in range(num_devices):
        counts = np.bincount(source_device[device], minlength=num_devices)
        np.testing.assert_array_equal(counts, per_device // num_devices)
    _, other, _ = _run_shuffle(num_devices, per_device, seed=1)
    assert not np.array_equal(shuffled, other)
    assert not np.array_equal(shuffled, images)


def test_inverse_permutation():
    perm = jax.random.permutation(jax.random.key(0), 17)
    x = jnp.arange(17) * 3
    np.testing.assert_array_equal(x[perm][inverse_permutation(perm)], x)


def _numpy_enqueue(queue, ptr, keys):
    queue = queue.copy()
    for key in keys:
        queue[ptr] = key
        ptr = (ptr + 1) % len(queue)
    return queue, ptr


@pytest.mark.parametrize("size,batch", [(10, 4), (7, 7), (12, 5), (16, 8)])
def test_enqueue_wraps_around_for_any_queue_size(size, batch):
    queue = np.asarray(init_queue(jax.random.key(0), size, 3))
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-6)
    expected_queue, expected_ptr = queue, 0
    jax_queue, jax_ptr = jnp.asarray(queue), jnp.zeros((), jnp.int32)
    rng = np.random.default_rng(0)
    for _ in range(5):
        keys = rng.standard_normal((batch, 3)).astype(np.float32)
        expected_queue, expected_ptr = _numpy_enqueue(expected_queue, expected_ptr, keys)
        jax_queue, jax_ptr = enqueue(jax_queue, jax_ptr, jnp.asarray(keys))
        np.testing.assert_array_equal(np.asarray(jax_queue), expected_queue)
        assert int(jax_ptr) == expected_ptr
