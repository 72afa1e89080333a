"""The MoCo encoder: a registered backbone followed by a projection head."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moco_jax.mesh import DATA_AXIS
from moco_jax.models.batch_norm import BatchNorm
from moco_jax.models.heads import HEADS
from moco_jax.models.registry import get_backbone_factory

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BN_MODES = ("shuffle", "sync", "local")


def bn_axis_name(bn_mode: str) -> str | None:
    """The mesh axis BN statistics are averaged over: only ``sync`` crosses devices."""
    return DATA_AXIS if bn_mode == "sync" else None


class Encoder(nn.Module):
    """Backbone -> head. Returns ``(pooled_features, embedding)``; the embedding is unnormalised."""

    backbone: nn.Module
    head: nn.Module

    def __call__(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        features = self.backbone(images, train=train)
        return features, self.head(features).astype(jnp.float32)


def build_encoder(model_config: Any, bn_axis_name: str | None = None) -> Encoder:
    """Encoder from a validated ``config.model``; ``bn_axis_name`` syncs BN statistics over
    that mesh axis."""
    dtype = DTYPES[model_config.dtype]
    norm = functools.partial(
        BatchNorm,
        momentum=0.9,
        epsilon=1e-5,
        group_size=model_config.bn_group_size,
        axis_name=bn_axis_name,
    )
    backbone = get_backbone_factory(model_config.backbone)(model_config, norm, dtype)
    head = HEADS[model_config.head](dim=model_config.dim, dtype=dtype)
    return Encoder(backbone=backbone, head=head)
