"""Backbone registry: a fork adds a backbone by name without touching the trainer.

A backbone factory takes the model config (an ``ml_collections.ConfigDict``, ``config.model``)
and returns a Flax module called as ``module(images, train=...)`` that maps ``[N, H, W, C]``
images to ``[N, F]`` pooled features. It must take its BatchNorm from the ``norm`` argument so
that MoCo's BN modes (``shuffle``/``sync``/``local``) reach every layer.

Example::

    @register_backbone("my_net")
    def _my_net(model_config, norm, dtype):
        return MyNet(width=base_width(model_config), norm=norm, dtype=dtype)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

BackboneFactory = Callable[[Any, Callable[..., nn.Module], jnp.dtype], nn.Module]

_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator that registers ``factory`` under ``name``."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = factory
        return factory

    return decorator


def base_width(model_config: Any) -> int:
    """Channels of a backbone's first stage: ``round(64 * model.width_multiplier)`` (16 at 0.25)."""
    return int(round(64 * model_config.width_multiplier))


def available_backbones() -> list[str]:
    """Names accepted by ``config.model.backbone``."""
    return sorted(_BACKBONES)


def get_backbone_factory(name: str) -> BackboneFactory:
    """The factory registered as ``name``; a clear error lists the known names otherwise."""
    if name not in _BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; available: {', '.join(available_backbones())}"
        )
    return _BACKBONES[name]
