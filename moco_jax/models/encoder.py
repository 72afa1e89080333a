"""The MoCo encoder: a registered backbone followed by a projection head."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moco_jax.mesh import DATA_AXIS
from moco_jax.models.batch_norm import BatchNorm
from moco_jax.models.heads import HEADS, V3_HEADS, BatchNormMLP, v3_predictor, v3_projector
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
        return features, self.head(features, train=train).astype(jnp.float32)


def _norm(model_config: Any, bn_axis_name: str | None):
    return functools.partial(
        BatchNorm,
        momentum=0.9,
        epsilon=1e-5,
        group_size=model_config.bn_group_size,
        axis_name=bn_axis_name,
    )


def build_encoder(model_config: Any, bn_axis_name: str | None = None) -> Encoder:
    """Encoder from a validated ``config.model``; ``bn_axis_name`` syncs BN statistics over
    that mesh axis. A v3 head is MoCo v3's projector (``model.mlp_dim`` wide, to ``model.dim``)."""
    dtype = DTYPES[model_config.dtype]
    norm = _norm(model_config, bn_axis_name)
    backbone = get_backbone_factory(model_config.backbone)(model_config, norm, dtype)
    if model_config.head in V3_HEADS:
        head = v3_projector(model_config.head, model_config.mlp_dim, model_config.dim, norm, dtype)
    else:
        head = HEADS[model_config.head](dim=model_config.dim, dtype=dtype)
    return Encoder(backbone=backbone, head=head)


def build_predictor(model_config: Any, bn_axis_name: str | None = None) -> BatchNormMLP:
    """MoCo v3's predictor for a v3 ``model.head`` (``model.dim`` -> ``model.mlp_dim`` ->
    ``model.dim``), its BatchNorm synced like the encoder's."""
    norm = _norm(model_config, bn_axis_name)
    dtype = DTYPES[model_config.dtype]
    return v3_predictor(model_config.head, model_config.mlp_dim, model_config.dim, norm, dtype)
