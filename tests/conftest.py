"""Test setup: 8 fake CPU devices (set before jax is imported) and a persistent compile cache."""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# torchvision (when installed) before TensorFlow: torchvision imports torch._dynamo, which loads
# triton's LLVM; loaded after TensorFlow's (TFDS), it segfaults the process (torch 2.14.1 +
# torchvision 0.29.1, tensorflow-cpu 2.x). Imported first, both work.
try:
    import torchvision  # noqa: E402,F401
except Exception:  # noqa: BLE001 - not installed, or a build for another torch
    pass

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
