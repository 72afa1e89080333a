"""A two-layer MLP backbone: small enough for NumPy re-statements and fast tests.

It exists so that the MoCo algorithm (queue, momentum encoder, Shuffle-BN, InfoNCE) can be
checked against an independent NumPy implementation with hand-written gradients; it is also a
minimal example of a registered backbone for forks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moco_jax.models.registry import base_width, register_backbone


class MLPBackbone(nn.Module):
    """Flatten -> Dense(no bias) -> BatchNorm -> ReLU."""

    width: int
    norm: Callable[..., nn.Module]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, name="fc1")(x)
        x = self.norm(use_running_average=not train, dtype=self.dtype, name="bn1")(x)
        return nn.relu(x).astype(jnp.float32)


@register_backbone("mlp")
def _mlp(model_config: Any, norm: Callable[..., nn.Module], dtype: jnp.dtype) -> nn.Module:
    return MLPBackbone(width=base_width(model_config), norm=norm, dtype=dtype)
