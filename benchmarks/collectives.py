"""Bytes the step's collectives move on an n-device mesh, compiled without running anything.

With fewer devices than n in this process, a fresh ``python -m benchmarks --collectives_worker``
process with n fake CPU devices compiles the step and prints the report as JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

import moco_jax
from benchmarks import compiled as compiled_info
from benchmarks.presets import REPO_ROOT, STEPS_PER_EPOCH
from moco_jax.mesh import batch_sharding


def abstract_images(setup: moco_jax.Setup) -> jax.ShapeDtypeStruct:
    """One global batch of float views sharded over the mesh, as a shape (nothing allocated)."""
    shape = (setup.config.batch_size, *setup.image_shape)
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding(setup.mesh))


def collective_report(setup: moco_jax.Setup, hlo_text: str) -> dict[str, Any]:
    """``compiled.collective_report`` of the step compiled for ``setup``'s mesh."""
    config = setup.config
    report = compiled_info.collective_report(
        hlo_text, setup.mesh.size, config.batch_size, setup.image_shape, config.model.dim
    )
    report["platform"] = setup.mesh.devices.flat[0].platform
    return report


def collectives_on_mesh(config: Any, num_devices: int) -> dict[str, Any]:
    """Compile the step for ``num_devices`` devices of this process (nothing is allocated)."""
    config = config.copy_and_resolve_references()
    config.num_devices = num_devices
    setup = moco_jax.build(config, STEPS_PER_EPOCH)
    images = abstract_images(setup)
    traced = setup.algorithm.train_step.trace(setup.abstract_state(), images, images)
    return collective_report(setup, traced.lower().compile().as_text())


def collectives_in_subprocess(config: Any, num_devices: int) -> dict[str, Any]:
    """``collectives_on_mesh`` in a fresh process with ``num_devices`` fake CPU devices."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(config.to_json())
        path = f.name
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks", "--collectives_worker", path]
    command += ["--collectives_devices", str(num_devices)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise RuntimeError(f"collectives worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def collectives_worker(config_json_path: str, num_devices: int) -> dict[str, Any]:
    config = ml_collections.ConfigDict(json.loads(pathlib.Path(config_json_path).read_text()))
    return collectives_on_mesh(config, num_devices)
