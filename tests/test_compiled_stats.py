"""Reading a compiled function's collectives from its HLO: loops count once per iteration."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moco_jax.mesh import DATA_AXIS, batch_sharding, make_data_mesh
from moco_jax.pod.compiled_stats import collectives_by_kind


def test_a_collective_in_a_loop_counts_once_per_iteration():
    """``lax.map`` over 6 chunks with an all-gather in its body, one psum after it: 6
    all-gathers of [8 devices x 4 rows, 3] float32 per call, and one all-reduce."""
    mesh = make_data_mesh(8)

    def per_device(x):  # [24, 3] rows of this device
        def body(chunk):
            return jax.lax.all_gather(chunk, DATA_AXIS, tiled=True).sum(0)

        sums = jax.lax.map(body, x.reshape(6, 4, 3))
        return jax.lax.psum(sums.sum(), DATA_AXIS)

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(DATA_AXIS), out_specs=P()))
    rows = jax.ShapeDtypeStruct((8 * 24, 3), jnp.float32, sharding=batch_sharding(mesh))
    hlo = fn.lower(rows).compile().as_text()
    kinds = collectives_by_kind(hlo, 8)
    assert kinds["all-gather"]["count"] == 6
    assert kinds["all-gather"]["result_bytes"] == 6 * 8 * 4 * 3 * 4
    assert kinds["all-gather"]["moved_bytes"] == 6 * 7 * 4 * 3 * 4
    assert kinds["all-reduce"]["count"] == 1
