"""H100 compile-only devices from the CUDA plugin's target description: no GPU, no CUDA driver."""

import importlib.metadata
import time

import jax
import jax.numpy as jnp
import jaxlib
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moco_jax.config.checks import ConfigError
from moco_jax.pod.gpu_target import gpu_topology_devices


def _plugin_version():
    try:
        return importlib.metadata.version("jax-cuda12-pjrt")
    except importlib.metadata.PackageNotFoundError:
        return None


needs_plugin = pytest.mark.skipif(
    _plugin_version() != jaxlib.__version__,
    reason=f"jax-cuda12-pjrt=={jaxlib.__version__} not installed "
    "(pip install -r requirements-gpu-compile.txt)",
)


def test_unknown_target_and_count():
    with pytest.raises(ConfigError, match="no GPU target"):
        gpu_topology_devices("h800")
    with pytest.raises(ConfigError, match="hosts of 8"):
        gpu_topology_devices("h100", 12)


@needs_plugin
def test_h100_devices_and_compile():
    topo = gpu_topology_devices("h100", 16)
    assert len(topo.devices) == 16 and topo.num_hosts == 2
    assert topo.device_kind == "NVIDIA H100 80GB HBM3"
    assert topo.hbm_per_device == 84942979072
    assert gpu_topology_devices("h100", 4).num_hosts == 1

    mesh = jax.sharding.Mesh(topo.devices, ("data",))
    w = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(lambda w, x: jnp.tanh(x @ w).sum())).lower(w, x).compile()
    print(f"H100 x16 compile of a tiny gradient: {time.perf_counter() - start:.2f} s")
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes == (256 * 256 + 32 * 256) * 4  # one device's share
    assert memory.output_size_in_bytes == 256 * 256 * 4
    assert "all-reduce" in compiled.as_text()  # the gradient summed over the 16 GPUs
    assert compiled.cost_analysis() is None  # compile-only GPU executables have none (jax 0.10.2)
