"""A TPU slice's devices without the chips: libtpu's compile-only topologies.

``topology_devices("v5e:16x16")`` returns the 256 devices of a v5e pod (64 hosts of 4 chips) on
any machine with ``libtpu`` installed (``requirements-tpu.txt``); jitted functions lowered with
shardings over a mesh of them compile with the real TPU compiler (``moco_jax.pod.compile_for``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from moco_jax.config.checks import ConfigError

GIB = 2**30

# HBM per chip by TPU generation, matched against ``device_kind``. Sources: Google Cloud TPU
# system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
HBM_PER_CHIP = (
    ("TPU v4", 32 * GIB),
    ("TPU v5 lite", 16 * GIB),  # v5e
    ("TPU v5", 95 * GIB),  # v5p
    ("TPU v6 lite", 32 * GIB),  # v6e (Trillium)
)
GENERATIONS = ("v4", "v5e", "v5p", "v6e")  # libtpu topology names, as HBM_PER_CHIP above
EXAMPLES = "v4:2x2x1, v5e:4x4, v5e:16x16, v5p:2x2x1, v6e:2x2, h100:8"
# Chips with two TensorCores show as one JAX device each ("megacore"), as on a real slice.
MEGACORE = ("v4", "v5p")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice to compile for: its devices, hosts and the memory of one device."""

    name: str
    devices: list[Any]
    hbm_per_chip: int
    devices_per_chip: int

    @property
    def num_hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def hbm_per_device(self) -> int:
        return self.hbm_per_chip // self.devices_per_chip


def hbm_per_chip(device_kind: str) -> int | None:
    """Bytes of HBM of one chip of this kind (None: not a known TPU)."""
    for pattern, size in HBM_PER_CHIP:
        if device_kind == pattern:
            return size
    return None


# libtpu reads these when it loads (also beside the CUDA plugin); without them it asks a
# metadata server and prints warnings. Set only while the devices are made (a real TPU VM's own
# values win): left in the environment, TPU_WORKER_HOSTNAMES would make a later train.py in a
# child process look for a TPU cluster.
LIBTPU_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # compile-only: no chip to guard with the lock
}


def topology_devices(name: str) -> Topology:
    """The compile-only devices of the TPU slice ``name`` (``generation:AxB[xC]``), or of
    ``h100[:N]`` (N H100 GPUs, 8 a host; default 8; ``moco_jax.pod.gpu_target``)."""
    added = {key: value for key, value in LIBTPU_ENV.items() if key not in os.environ}
    os.environ.update(added)
    try:
        return _devices(name)
    finally:
        for key in added:
            os.environ.pop(key, None)


def _devices(name: str) -> Topology:
    generation, _, shape = name.partition(":")
    if generation == "h100":
        from moco_jax.pod.gpu_target import PER_HOST, gpu_topology_devices

        if shape and not shape.isdigit():
            raise ConfigError(f"--compile_for {name!r}: give h100 or h100:N (N GPUs)")
        gpus = gpu_topology_devices("h100", int(shape or PER_HOST))
        return Topology(name, list(gpus.devices), gpus.hbm_per_device, 1)
    if generation not in GENERATIONS or not shape:
        raise ConfigError(
            f"--compile_for {name!r} is not a TPU topology or h100[:N]; e.g. {EXAMPLES}"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            "--compile_for needs the TPU compiler: pip install -r requirements-tpu.txt (libtpu, "
            "the version jax[tpu] pins for the installed jax)"
        )
    from jax.experimental import topologies

    options = {"chip_config_name": "megacore"} if generation in MEGACORE else {}
    try:
        devices = topologies.get_topology_desc(
            platform="tpu", topology_name=name, **options
        ).devices
    except Exception as err:  # libtpu's own message names what it does not know
        raise ConfigError(
            f"--compile_for {name!r}: libtpu has no such topology ({str(err).splitlines()[0]}); "
            f"e.g. {EXAMPLES}"
        ) from err
    chips = {(d.process_index, tuple(d.coords)) for d in devices}  # v4 without megacore: 2 each
    size = hbm_per_chip(devices[0].device_kind)
    if size is None:
        raise ConfigError(f"no HBM size known for {devices[0].device_kind} ({name})")
    return Topology(name, list(devices), size, len(devices) // len(chips))
