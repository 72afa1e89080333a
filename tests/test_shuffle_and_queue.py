"""Shuffle-BN's all_to_all exchange and the queue's wrap-around, checked against plain NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import numpy_moco
from moco_jax.algorithms.queue import enqueue, init_queue
from moco_jax.algorithms.shuffle_bn import (
    inverse_permutation,
    shuffle_batch,
    shuffle_permutations,
)
from moco_jax.mesh import DATA_AXIS, make_data_mesh, shard_batch


def images_of(num_devices, per_device):
    """Each "image" is its own global index, so we can see where it travelled."""
    return np.arange(num_devices * per_device, dtype=np.float32).reshape(-1, 1)


def _shuffled_keys(images, num_devices, seed, group, key_encoder):
    """Shuffle ``images`` over ``num_devices`` in groups of ``group`` (None: all), apply the
    per-device ``key_encoder`` to the shuffled batch, un-shuffle: (shuffled, keys)."""
    mesh = make_data_mesh(num_devices)

    def per_device_fn(x, rng):
        shuffled, unshuffle = shuffle_batch(x, rng, DATA_AXIS, num_devices, group)
        return shuffled, unshuffle(key_encoder(shuffled))

    fn = jax.jit(
        jax.shard_map(
            per_device_fn,
            mesh=mesh,
            in_specs=(P(DATA_AXIS), P()),
            out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
        )
    )
    shuffled, keys = fn(shard_batch(mesh, images), jax.random.key(seed))
    return np.asarray(shuffled), np.asarray(keys)


def _run_shuffle(num_devices, per_device, seed, group=None):
    images = images_of(num_devices, per_device)
    # a per-example "key encoder"
    shuffled, keys = _shuffled_keys(images, num_devices, seed, group, lambda x: x * 10.0 + 1.0)
    return images, shuffled, keys


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


def _run_grouped_bn(num_devices, per_device, group, seed):
    """Shuffle within groups of ``group`` devices, normalise each device's shuffled batch by its
    own statistics (what BatchNorm does to a key), un-shuffle."""
    images = np.random.default_rng(seed).normal(size=(num_devices * per_device, 3))
    images = images.astype(np.float32)

    def batch_norm(x):
        return (x - jnp.mean(x, 0)) / jnp.sqrt(jnp.var(x, 0) + 1e-5)

    shuffled, keys = _shuffled_keys(images, num_devices, seed, group, batch_norm)
    return images, shuffled, keys


@pytest.mark.parametrize("group", [2, 4, 8])
def test_group_shuffle_matches_numpy_and_bn_statistics_come_from_the_group(group):
    """On 8 devices, groups of ``group``: the key encoder's batch on each device is NumPy's
    re-statement of the group exchange (``numpy_moco.shuffle_bn_permutation``, the random draws
    taken from jax), each key is normalised by the statistics of that permuted group batch, and
    the un-shuffle returns every key to its image exactly. ``group`` 8 is one group: today's
    exchange."""
    num_devices, per_device, seed = 8, 16, 5
    images, shuffled, keys = _run_grouped_bn(num_devices, per_device, group, seed)
    perms = [shuffle_permutations(jax.random.key(seed), d, per_device) for d in range(8)]
    perm = numpy_moco.shuffle_bn_permutation(
        [np.asarray(s) for s, _ in perms], [np.asarray(r) for _, r in perms], group
    )
    np.testing.assert_array_equal(shuffled, images[perm])
    expected = np.empty_like(images)
    for device in range(num_devices):
        rows = perm[device * per_device : (device + 1) * per_device]
        # Each device's BN batch: per_device / group images from every device of its group.
        sources = rows // per_device
        first = device - device % group
        counts = np.bincount(sources - first, minlength=group)
        np.testing.assert_array_equal(counts, per_device // group)
        batch = images[rows]
        expected[rows] = (batch - batch.mean(0)) / np.sqrt(batch.var(0) + 1e-5)
    np.testing.assert_allclose(keys, expected, rtol=1e-5, atol=1e-5)
    # The un-shuffle is exact: with an identity "encoder" every image comes back in place.
    _, _, back = _run_shuffle(num_devices, per_device, seed, group)
    np.testing.assert_array_equal(back, images_of(num_devices, per_device) * 10.0 + 1.0)


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
