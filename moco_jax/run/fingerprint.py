"""Per-array checksums and finiteness of a state: what a checkpoint is verified against.

Orbax writes atomically but does not verify what it reads back; a flipped bit in a stored array
would resume silently. Each save records these checksums in the checkpoint's metadata and each
restore recomputes them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def path_name(path: tuple) -> str:
    """``params/backbone/fc1/kernel`` for a pytree key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def keys_as_data(tree: Any) -> Any:
    """``tree`` with each PRNG key array replaced by its ``uint32`` key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def data_as_keys(tree: Any, template: Any) -> Any:
    """Undo ``keys_as_data``: key data where ``template`` holds a key becomes that kind of key."""

    def wrap(x, like):
        if not _is_key(like) or _is_key(x):
            return x
        return jax.random.wrap_key_data(x, impl=jax.random.key_impl(like))

    return jax.tree.map(wrap, tree, template)


def _host_copy(x: jax.Array) -> np.ndarray:
    """This process's copy of a (replicated) array; PRNG keys as their key data."""
    x = keys_as_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # the state is replicated: every process holds all of it
    return np.ascontiguousarray(np.asarray(x))


def _leaf_summary(x: jax.Array) -> tuple[bool, list[int]]:
    array = _host_copy(x)
    finite = True
    if jnp.issubdtype(array.dtype, jnp.inexact):
        finite = bool(np.isfinite(array.astype(np.float32, copy=False)).all())
    raw = array.reshape(-1)
    size = raw.dtype.itemsize
    words = raw.view(np.uint32) if size % 4 == 0 else raw.view(f"u{size}").astype(np.uint32)
    weights = np.arange(words.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    checks = [int(words.sum(dtype=np.uint32)), int((words * weights).sum(dtype=np.uint32))]
    return finite, checks


def summarize(state: Any) -> tuple[dict[str, bool], dict[str, list[int]]]:
    """Per array: whether it is finite, and a position-weighted checksum of its bits.

    The checksum is two wrapping ``uint32`` sums of the array's 32-bit words (plain, and weighted
    by odd position factors), so any flipped bit, zeroed block or swapped pair of values changes
    it. Computed on the host from the same values orbax copies there to save them.
    """
    finite, checks = {}, {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if hasattr(x, "shape"):
            name = path_name(path)
            finite[name], checks[name] = _leaf_summary(x)
    return finite, checks


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every array (or array metadata) leaf of ``tree``."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(p): tuple(x.shape) for p, x in flat if hasattr(x, "shape")}


def state_shapes(template: Any) -> dict[str, tuple[int, ...]]:
    """Shapes as saved: PRNG keys are stored as their ``uint32`` key data."""
    return shapes(jax.eval_shape(keys_as_data, template))


def shape_problems(saved: dict, current: dict) -> list[str]:
    """What differs between two ``shapes`` tables, one line per array."""
    problems = [f"{p} missing in the checkpoint" for p in current if p not in saved]
    problems += [f"{p} not in this config" for p in saved if p not in current]
    problems += [
        f"{p} {list(saved[p])} (checkpoint) vs {list(current[p])} (now)"
        for p in current
        if p in saved and saved[p] != current[p]
    ]
    return problems
