"""Backbones, heads and the MoCo encoder. Importing this registers the built-in backbones."""

from moco_jax.models import mlp, resnet  # noqa: F401  (registers backbones)
from moco_jax.models.encoder import Encoder, build_encoder
from moco_jax.models.registry import available_backbones, get_backbone_factory, register_backbone

__all__ = [
    "Encoder",
    "available_backbones",
    "build_encoder",
    "get_backbone_factory",
    "register_backbone",
]
