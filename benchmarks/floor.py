"""The step's convolutions and matmuls, their FLOPs, and XLA's floor: their time measured alone.

How the floor is measured: the jaxpr of the jitted training step (the very function that is
timed, traced with the same arguments) is walked, including the per-device body of its
``shard_map`` and the forward, input-gradient and weight-gradient convolutions that autodiff
emitted. Every ``conv_general_dilated`` and ``dot_general`` is collected with its operand
shapes, dtypes and parameters; identical ones are grouped and counted. Each distinct op is then
compiled alone by XLA (``jax.jit`` of just that primitive with the same parameters), run on
random operands of the same shapes on one device, warmed up, and timed (median over repeats of
back-to-back calls, each repeat synchronised at its end). The floor is the count-weighted sum of
these medians: the time the step would take if it did nothing but its convolutions and matmuls
the way XLA compiles them one at a time. ``step_over_floor`` = per-device step time / floor;
1.0 would mean everything else (BatchNorm, ReLU, optimizer, EMA, queue, shuffles) is free.
The floor of a multi-device step is per device; compare it with a 1-device run.

Model FLOPs (for MFU) follow the usual convention: 2 x MACs of the encoder's forward
convolutions and matmuls per image (exact, from the forward jaxpr), times 3 for the query
encoder (forward + backward) plus 1 for the key encoder, plus the logits ``q . [k+, queue]``
forward and backward (``4 * dim * (K + 1)``). XLA's own count (``cost_analysis``) is reported
next to it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

MATMUL_PRIMITIVES = ("conv_general_dilated", "dot_general")


@dataclasses.dataclass
class MatmulOp:
    """One distinct convolution or matmul of a jaxpr and how often it occurs."""

    eqn: Any
    count: int

    @property
    def name(self) -> str:
        return self.eqn.primitive.name

    @property
    def operands(self) -> list[tuple[tuple[int, ...], str]]:
        return [(tuple(v.aval.shape), str(v.aval.dtype)) for v in self.eqn.invars]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for shape, _ in self.operands]

    @property
    def dtypes(self) -> list[str]:
        return [dtype for _, dtype in self.operands]

    @property
    def flops(self) -> float:
        return matmul_flops(self.eqn)


def matmul_flops(eqn: Any) -> float:
    """2 x multiply-adds of one ``conv_general_dilated`` / ``dot_general`` as written.

    Convolutions: every output element is a dot product over the kernel window and the input
    features of its group, i.e. ``prod(rhs.shape) / rhs_out_features`` terms (zeros inserted by
    ``lhs_dilation`` in strided-conv gradients count too: this is what a direct lowering does).
    """
    out_size = float(np.prod(eqn.outvars[0].aval.shape))
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs_shape = eqn.invars[0].aval.shape
        return 2.0 * out_size * float(np.prod([lhs_shape[d] for d in lhs_contract]))
    rhs_shape = eqn.invars[1].aval.shape
    rhs_out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return 2.0 * out_size * float(np.prod(rhs_shape)) / rhs_shape[rhs_out_dim]


def _op_key(eqn: Any) -> str:
    operands = [(tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars]
    params = sorted((k, repr(v)) for k, v in eqn.params.items())
    return repr((eqn.primitive.name, operands, params))


def collect_matmuls(jaxpr: Any) -> list[MatmulOp]:
    """Distinct convolutions and matmuls of a (closed) jaxpr and all its sub-jaxprs, counted.

    ``scan`` bodies count ``length`` times; other loops once (a MoCo step has none).
    """
    ops: dict[str, MatmulOp] = {}

    def walk(jx: Any, multiplier: int) -> None:
        for eqn in jx.eqns:
            if eqn.primitive.name in MATMUL_PRIMITIVES:
                key = _op_key(eqn)
                if key in ops:
                    ops[key].count += multiplier
                else:
                    ops[key] = MatmulOp(eqn, multiplier)
            inner = multiplier * (
                eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            )
            for sub in jcore.jaxprs_in_params(eqn.params):
                walk(sub, inner)

    walk(getattr(jaxpr, "jaxpr", jaxpr), 1)
    return list(ops.values())


def forward_matmul_flops(model: Any, variables: dict, images: jax.Array) -> float:
    """FLOPs of the encoder's convolutions and matmuls in one training-mode forward pass."""
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images
    )
    return sum(op.flops * op.count for op in collect_matmuls(jaxpr))


def _random_operand(key: jax.Array, shape: tuple[int, ...], dtype: str, device) -> jax.Array:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        value = jax.random.normal(key, shape, jnp.float32).astype(dtype)
    else:
        value = jnp.ones(shape, dtype)
    return jax.device_put(value, device)


def time_alone(op: MatmulOp, device, repeats: int = 5, target_s: float = 0.05) -> float:
    """Median seconds of one call of ``op`` compiled alone by XLA on ``device``."""
    eqn = op.eqn
    params = dict(eqn.params)
    if params.get("out_sharding") is not None:  # explicit-sharding metadata of the mesh
        params["out_sharding"] = None
    keys = jax.random.split(jax.random.key(0), len(eqn.invars))
    args = [
        _random_operand(k, tuple(v.aval.shape), str(v.aval.dtype), device)
        for k, v in zip(keys, eqn.invars, strict=True)
    ]
    compiled = jax.jit(lambda *a: eqn.primitive.bind(*a, **params)).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm-up
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    inner = int(min(100, max(1, target_s / max(time.perf_counter() - start, 1e-7))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = compiled(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def xla_floor(step_jaxpr: Any, device, repeats: int = 5) -> dict[str, Any]:
    """Time every distinct conv/matmul of the step alone; their count-weighted sum is the floor."""
    ops = collect_matmuls(step_jaxpr)
    rows = []
    for op in sorted(ops, key=lambda o: -o.flops * o.count):
        seconds = time_alone(op, device, repeats)
        rows.append(
            {
                "op": op.name,
                "operands": [f"{dtype}{list(shape)}" for shape, dtype in op.operands],
                "count": op.count,
                "ms_each": seconds * 1e3,
                "gflop_per_s": op.flops / seconds / 1e9 if seconds > 0 else None,
            }
        )
    floor_s = sum(r["ms_each"] * r["count"] for r in rows) / 1e3
    flops = sum(op.flops * op.count for op in ops)
    return {
        "floor_ms": floor_s * 1e3,
        "matmul_flops_per_step_per_device": flops,
        "floor_gflop_per_s": flops / floor_s / 1e9 if floor_s > 0 else None,
        "distinct_ops": len(ops),
        "total_ops": sum(op.count for op in ops),
        "ops": rows,
        "method": (
            "every conv_general_dilated/dot_general of the step's jaxpr (forward, input- and "
            "weight-gradient), compiled alone by XLA with the same shapes, dtypes and "
            "parameters on one device; median of back-to-back calls; count-weighted sum"
        ),
    }


def floor_pairs(
    step_jaxpr: Any, device, time_step: Callable[[], float], pairs: int, repeats: int = 5
) -> dict[str, Any]:
    """The floor and then the step, ``pairs`` times back to back: ``step_over_floor`` per pair.

    One floor and one step timing taken minutes apart can disagree by the machine's drift (on a
    shared CPU, ~10% between runs); each pair here is taken within seconds. ``time_step()``
    returns the step's median seconds. Reports every pair and the median of their ratios.
    """
    rows = []
    for _ in range(pairs):
        floor_ms = xla_floor(step_jaxpr, device, repeats)["floor_ms"]
        step_ms = time_step() * 1e3
        ratio = step_ms / floor_ms
        rows.append({"floor_ms": floor_ms, "step_ms": step_ms, "step_over_floor": ratio})
    return {
        "pairs": rows,
        "step_over_floor_median": statistics.median(r["step_over_floor"] for r in rows),
    }
