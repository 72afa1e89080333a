"""Sums over devices: in device order (``ordered_reductions``), exact whatever the process
split; gradients in float32 whatever the model's compute dtype."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


@pytest.mark.parametrize("algorithm", ["moco", "moco_v3"])
def test_bfloat16_gradients_are_averaged_in_float32(algorithm):
    """A bfloat16 model's gradients cross devices as float32 (the params' dtype): every
    all-reduce of the lowered step is float32 or integer, none is bfloat16."""
    from tiny import setup, tiny_config

    overrides = {"model.backbone": "mlp", "dataset.image_size": 28, "model.dtype": "bfloat16"}
    if algorithm == "moco_v3":
        overrides.update({"algorithm": "moco_v3", "model.head": "v3_resnet", "model.mlp_dim": 16})
        overrides.update({"model.bn_mode": "sync", "optim.name": "lars", "moco.queue_size": 64})
    built = setup(tiny_config(**overrides), 8)
    state = built.abstract_state()
    views = jax.ShapeDtypeStruct((64, 28, 28, 1), jnp.float32, sharding=batch_sharding(built.mesh))
    # The lowered program (a backend may promote bfloat16 all-reduces to float32 itself).
    text = built.algorithm.train_step.lower(state, views, views).as_text()
    reduced = re.findall(r"stablehlo.all_reduce.*?\}\) : \(([^)]*)\)", text, re.S)
    assert reduced and not [types for types in reduced if "bf16" in types], reduced
