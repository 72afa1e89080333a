"""The reference tests' programs compiled without LLVM's optimisation passes.

The parity tests (NumPy and PyTorch re-statements) run a handful of steps of programs that each
compile once: with XLA's default CPU back end, LLVM's optimisation passes take most of that
(tens of seconds for a tiny ResNet's initial state, whose random initialisers unroll badly),
while the run itself takes milliseconds. ``xla_backend_optimization_level=0`` compiles the same
HLO (the same fusions and order of operations, so the same arithmetic) into less optimised
machine code in a fraction of the time; ``tests/test_multiprocess_train.py`` passes the same
option to its child processes as an ``XLA_FLAGS`` flag.
"""

from __future__ import annotations

import jax

from moco_jax.mesh import replicated

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def initial_state(setup, seed: int):
    """``setup.initial_state(seed)`` (the same jit, replicated over the mesh), compiled fast."""
    rng = jax.random.key(seed)
    init = jax.jit(setup.algorithm.init_state, out_shardings=replicated(setup.mesh))
    return init.lower(rng).compile(FAST_COMPILE)(rng)


def train_step(setup):
    """``setup.algorithm.train_step``, compiled fast at its first call for that call's shapes
    (every later call must have the same)."""
    compiled = []

    def step(state, view_a, view_b):
        if not compiled:
            lowered = setup.algorithm.train_step.lower(state, view_a, view_b)
            compiled.append(lowered.compile(FAST_COMPILE))
        return compiled[0](state, view_a, view_b)

    return step
