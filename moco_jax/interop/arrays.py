"""Array conversion across the PyTorch border, numpy only: a file's tensor as a checked array,
and each framework's layout of the same weights. Knows no names and no files.

  convolution: torch ``weight [O, I, H, W]`` <-> Flax ``kernel [H, W, I, O]``
  Linear:      torch ``weight [out, in]``    <-> Flax ``kernel [in, out]``
  anything else (biases, BatchNorm and LayerNorm vectors, tokens) is the same array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moco_jax.interop.errors import WeightBridgeError


def checked_array(name: Any, tensor: Any, leaf: str) -> np.ndarray:
    """``tensor`` as a numpy array, or ``WeightBridgeError`` naming what is wrong with it."""
    if not hasattr(tensor, "shape") or not hasattr(tensor, "dtype"):
        raise WeightBridgeError(f"{name!r} holds a {type(tensor).__name__}, not a tensor")
    value = np.asarray(tensor)
    if leaf != "num_batches_tracked" and not np.issubdtype(value.dtype, np.floating):
        raise WeightBridgeError(f"{name!r} has dtype {value.dtype}; weights must be floating point")
    if leaf != "num_batches_tracked" and not np.isfinite(value).all():
        raise WeightBridgeError(f"{name!r} holds NaN or infinite values")
    return value


def to_torch(kernel: Any) -> np.ndarray:
    """A Flax kernel in torch's layout: ``[H, W, I, O]`` -> ``[O, I, H, W]``, ``[in, out]`` ->
    ``[out, in]``; any other array as it is."""
    value = np.asarray(kernel)
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(value.T) if value.ndim == 2 else value


def to_flax(weight: np.ndarray) -> np.ndarray:
    """The inverse of ``to_torch``: a torch weight in Flax's layout."""
    if weight.ndim == 4:
        return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
    return np.ascontiguousarray(weight.T) if weight.ndim == 2 else weight
