"""Projection heads of MoCo v1 (linear) and v2 (MLP), named as in the official code.

The official code replaces torchvision's ``fc`` with the head, so the v1 head is ``fc`` and the v2
head is ``fc.0`` (Linear, hidden width = backbone feature width) / ``fc.2`` (Linear to ``dim``);
the Flax names ``fc``, ``fc0``, ``fc2`` map onto those.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default ``nn.Linear`` bias init."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# PyTorch's default nn.Linear weight init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), ..).
torch_linear_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_dense(features: int, fan_in: int, name: str, dtype: jnp.dtype) -> nn.Dense:
    """A Dense layer initialised as PyTorch's ``nn.Linear``."""
    return nn.Dense(
        features,
        kernel_init=torch_linear_kernel_init,
        bias_init=torch_linear_bias_init(fan_in),
        dtype=dtype,
        name=name,
    )


class LinearHead(nn.Module):
    """MoCo v1: one linear layer to ``dim``."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        return torch_dense(self.dim, features.shape[-1], "fc", self.dtype)(features)


class MLPHead(nn.Module):
    """MoCo v2: Linear(F, F) -> ReLU -> Linear(F, dim), F the backbone feature width."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        width = features.shape[-1]
        hidden = nn.relu(torch_dense(width, width, "fc0", self.dtype)(features))
        return torch_dense(self.dim, width, "fc2", self.dtype)(hidden)


HEADS = {"linear": LinearHead, "mlp": MLPHead}
