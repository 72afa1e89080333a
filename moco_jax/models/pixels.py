"""Raw pixels as the "backbone": the baseline every learned encoder has to beat.

``model.backbone=pixels`` makes the features of an image its normalised pixels, flattened (no
parameters, nothing to pretrain). Linear evaluation on it is the raw-pixel linear probe:

    python -m moco_jax.evaluate linear --config configs/linear_fashion_mnist.py \
        --config.model.backbone=pixels --config.linear.cached_features=True --workdir W
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moco_jax.models.registry import register_backbone


class Pixels(nn.Module):
    """``[N, H, W, C]`` -> ``[N, H * W * C]``, the image itself."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        return x.reshape(x.shape[0], -1).astype(jnp.float32)


@register_backbone("pixels")
def _pixels(model_config: Any, norm: Callable[..., nn.Module], dtype: jnp.dtype) -> nn.Module:
    del model_config, norm, dtype
    return Pixels()
