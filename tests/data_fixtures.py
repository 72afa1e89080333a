"""The real Fashion-MNIST, prepared once per machine into a repo-local TFDS directory."""

import fcntl
import pathlib

import pytest

from moco_jax.data import local_sources

DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / ".tfds_cache"


def fashion_mnist_data_dir() -> str:
    if not local_sources.FASHION_MNIST_DIR.exists():
        pytest.skip(
            f"{local_sources.FASHION_MNIST_DIR} missing: {local_sources.INSTALL_HINT} "
            "(the README's test command installs it)"
        )
    from moco_jax.data.tfds_source import prepared_builder

    # pytest-xdist workers may get here at once: one prepares, the others wait and reuse it.
    with open(DATA_DIR.parent / ".tfds_cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prepared_builder("fashion_mnist", str(DATA_DIR))
    return str(DATA_DIR)
