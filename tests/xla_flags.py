"""The XLA flags of the tests and of the programs they start.

``--xla_backend_optimization_level=0``: the CPU backend compiles without LLVM's optimisation
passes. The tests' models are tiny, so what they lose in run time is little, and compiling is most
of what the suite does on a fresh clone (a cold smoke pretraining run: 101 s of CPU with the
default level, 39 s with 0). Every run a test compares with another bit for bit uses the same
flags (the results of two levels may differ in the last bits). Benchmarks keep XLA's defaults.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_devices(count: int) -> str:
    """XLA_FLAGS for ``count`` fake CPU devices, compiled as every test compiles."""
    return f"--xla_force_host_platform_device_count={count} {FAST_COMPILE}"
