"""Test setup: 8 fake CPU devices (set before jax is imported) and a persistent compile cache."""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from xla_flags import cpu_devices  # noqa: E402

# 8 fake CPU devices, compiled fast (tests/xla_flags.py), for the tests and the programs they start.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {cpu_devices(8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# What the programs set before TensorFlow starts (cli_errors.quiet_native_logs), which jax's import
# would set otherwise (to "1"): the tests' subprocesses see a user's settings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# The persistent compile cache, for the tests (jax reads these at import) and the programs they
# start: one setting for both.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# torchvision (when installed) before TensorFlow: torchvision imports torch._dynamo, which loads
# triton's LLVM; loaded after TensorFlow's (TFDS), it segfaults the process (torch 2.14.1 +
# torchvision 0.29.1, tensorflow-cpu 2.x). Imported first, both work.
try:
    import torchvision  # noqa: F401
except Exception:  # not installed, or a build for another torch
    pass

import jax  # noqa: E402, F401  (after torchvision; reads the compile cache settings above)

# The slowest test files (cold, quiet 2-core machine, pytest -n 2 --dist loadfile; with
# --no-loadscope-reorder, or pytest-xdist 3.8 orders files by their number of tests), first: each
# file runs whole on one worker, so starting the long ones first lets the two workers end
# together instead of one finishing a long file alone at the end.
SLOW_FIRST = (  # fresh clone of 21467d9, 2026-12-07: seconds of one worker per file
    "test_multiprocess_train.py",  # 200
    "test_resume.py",  # 184
    "test_streaming.py",  # 93
    "test_train.py",  # 88
    "test_moco_v3_workflow.py",  # 83
    "test_benchmark.py",  # 78
    "test_linear.py",  # 66
    "test_bad_input.py",  # 65
    "test_torch_moco_v3.py",  # 65
    "test_numpy_reference.py",  # 60
    "test_compile_for.py",  # 52
    "test_folder_runs.py",  # 46
    "test_moco_v3.py",  # 42
    "test_reading_runs.py",  # 42
    "test_disk_full.py",  # 38
    "test_torch_reference.py",  # 27
    "test_export.py",  # 26
    "test_torch_bridge.py",  # 25
    "test_augment.py",  # 24
    "test_step.py",  # 19
    "test_special_files.py",  # 17
    "test_shuffle_and_queue.py",  # 17
    "test_torch_bridge_vit.py",  # 16
    "test_show.py",  # 13
    "test_checkpointing.py",  # 12
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


def pytest_sessionfinish(session):
    """The fork server of tests/forkserver.py (started by the tests that need it) goes with us."""
    forkserver = sys.modules.get("forkserver")
    if forkserver is not None and forkserver._SERVER is not None:
        forkserver._SERVER.close()
