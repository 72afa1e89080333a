"""The library stays a library: the benchmarks and the PyTorch re-statement live beside it in
``benchmarks/``, and training or evaluating never imports torch (``interop.torch_files`` imports
it only at the moment it reads a ``.pth`` file); the layering of ``.importlinter`` holds."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_library_does_not_import_torch_or_the_benchmarks():
    """A fresh process (this one may have imported both) imports the package, the trainer and
    evaluation: neither torch nor ``benchmarks`` is among its modules."""
    code = (
        "import sys, moco_jax, moco_jax.run.trainer, moco_jax.evaluate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'benchmarks')))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_import_contracts_hold():
    """``lint-imports`` checks the contracts of ``.importlinter`` (who may import whom: the core
    below the run, pod only from the entry points, torch behind the interop door, ...)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["lint-imports"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
