"""Sums over devices in device order (``ordered_reductions``): exact, whatever the process split."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moco_jax.mesh import DATA_AXIS, batch_sharding, make_data_mesh, ordered_sum


def test_ordered_sum_adds_in_device_order():
    """Equal bit for bit to NumPy's ((x0 + x1) + x2) + ... in float32, for a tree of leaves of
    several shapes and dtypes (bfloat16 added in float32, returned in bfloat16)."""
    mesh = make_data_mesh(8)
    rng = np.random.default_rng(0)
    scales = 10.0 ** rng.integers(-6, 6, (8, 3, 5))  # sums whose order shows in the bits
    values = {
        "a": (rng.standard_normal((8, 3, 5)) * scales).astype(np.float32),
        "b": rng.standard_normal((8, 7)).astype(np.float32),
        "c": rng.standard_normal((8,)).astype(jnp.bfloat16),
    }

    def per_device(tree):
        return ordered_sum(jax.tree.map(lambda x: x[0], tree))

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(DATA_AXIS), out_specs=P()))
    ours = fn(jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh)), values))
    for name, x in values.items():
        expected = x[0].astype(np.float32)
        for row in x[1:]:
            expected = expected + row.astype(np.float32)
        assert ours[name].dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(ours[name]), expected.astype(x.dtype), name)
    # The order shows: adding the same values last device first gives other bits.
    backwards = values["a"][-1]
    for row in values["a"][-2::-1]:
        backwards = backwards + row
    assert not np.array_equal(np.asarray(ours["a"]), backwards)
