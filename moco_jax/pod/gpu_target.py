"""NVIDIA GPUs without the GPUs: the CUDA plugin's compile-only devices from a target description.

``gpu_topology_devices("h100", 16)`` returns 16 compile-only H100 devices (2 hosts of 8) on any
machine, no GPU or CUDA driver needed, once ``requirements-gpu-compile.txt`` is installed (the CUDA
PJRT plugin matching jaxlib; no NVIDIA library wheels: ptxas is linked into the plugin). Jitted
functions lowered with shardings over a mesh of them compile to sm_90a cubins with XLA's real GPU
pipeline; ``memory_analysis()`` and ``as_text()`` work, ``cost_analysis()`` is None (the plugin's
compile-only executable answers UNIMPLEMENTED). Autotuning is off (nothing to time on), so gemm
and convolution choices are XLA's defaults; the buffers and collectives are those of a real run.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from typing import Any

from moco_jax.config.checks import ConfigError

PER_HOST = 8
PACKAGE = "jax-cuda12-pjrt"
# GpuTargetConfigProto (text format) of an H100 SXM 80 GB: the fields XLA's compiler reads, as CUDA
# reports them on that GPU (after XLA's xla/backends/gpu/target_config/specs/h100_sxm.txtpb).
H100_SXM = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 feature_extension: ACCELERATED_FEATURES }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation" platform_version: "Compute Capability 9.0a"
  device_address_bits: 64 pcie_bandwidth: 34359738368 ecc_enabled: true
  name: "NVIDIA H100 80GB HBM3" dnn_version: "9.10.0" device_interconnect_info { active_links: 18 }
}
platform_name: "CUDA" dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
# name -> (target config, bytes of device memory as CUDA reports it: 79.1 GiB of the 80 GB HBM3)
TARGETS = {"h100": (H100_SXM, 84942979072)}


@dataclasses.dataclass(frozen=True)
class GpuTopology:
    """GPUs to compile for (read like ``moco_jax.pod.topology.Topology``: one device a chip)."""

    name: str
    devices: list[Any]
    hbm_per_device: int
    num_hosts: int

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind


def gpu_topology_devices(name: str, num_devices: int = PER_HOST) -> GpuTopology:
    """``num_devices`` compile-only GPUs of kind ``name`` (``PER_HOST`` a host, as on a DGX)."""
    if name not in TARGETS:
        raise ConfigError(f"--compile_for {name!r}: no GPU target of that name; one of {TARGETS}")
    per_host = min(num_devices, PER_HOST)
    if num_devices < 1 or num_devices % per_host:
        raise ConfigError(f"--compile_for {name}: {num_devices} GPUs is not hosts of {PER_HOST}")
    try:
        plugin = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        plugin = None
    import jaxlib

    if plugin != jaxlib.__version__:
        raise ConfigError(
            f"--compile_for {name} needs the CUDA compiler plugin for jaxlib {jaxlib.__version__} "
            f"(found {plugin}): pip install -r requirements-gpu-compile.txt"
        )
    # Compiling needs no CUDA runtime: skip the plugin's check for one (read at jax's first use).
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    config, memory = TARGETS[name]
    shape = f"1x{num_devices // per_host}x{per_host}"
    try:
        devices = topologies.get_topology_desc(
            platform="cuda", topology_name=name, target_config=config, topology=shape
        ).devices
    except NotImplementedError as err:  # the plugin's initialize() failed when jax first started
        raise ConfigError(
            f"--compile_for {name}: the CUDA plugin did not load ({err}); start jax with "
            "JAX_PLATFORMS=cpu or JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1"
        ) from err
    return GpuTopology(name, list(devices), memory, num_devices // per_host)
