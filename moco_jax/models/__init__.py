"""Backbones, heads and the MoCo encoder. Importing this registers the built-in backbones."""

from moco_jax.models import mlp, pixels, resnet, vit  # noqa: F401  (registers backbones)
from moco_jax.models.encoder import BN_MODES, DTYPES, Encoder, bn_axis_name, build_encoder
from moco_jax.models.registry import (
    available_backbones,
    base_width,
    get_backbone_factory,
    register_backbone,
)

__all__ = [
    "BN_MODES",
    "DTYPES",
    "Encoder",
    "available_backbones",
    "base_width",
    "bn_axis_name",
    "build_encoder",
    "get_backbone_factory",
    "register_backbone",
]
