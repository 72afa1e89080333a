"""Run a command line with the fault injection of ``faults.py`` installed (its MOCO_JAX_FAULT_*
variables): ``python tests/with_faults.py train.py ARGS`` or
``python tests/with_faults.py -m moco_jax.evaluate ARGS``, as the command would run alone."""

import pathlib
import runpy
import sys

TESTS = pathlib.Path(__file__).resolve().parent

if __name__ == "__main__":
    sys.path[:1] = [str(TESTS.parent), str(TESTS)]  # the repository's moco_jax, and faults.py
    import faults

    faults.install()
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
