"""The backbone a PyTorch weights file holds, read from its tensor names and shapes.

Linear evaluation of a pretraining workdir takes the backbone from that run's ``config.json``;
of a ``.pth``/``.pth.tar`` or detectron2 file (an official MoCo v1/v2 or moco-v3 checkpoint, a
torchvision, timm or DeiT state dict) it takes it from here:

- a torchvision ResNet: the number of blocks of ``layer1``..``layer4`` and their kind
  (``conv3`` only in a bottleneck) name the depth, ``conv1``'s output channels / 64 is
  ``model.width_multiplier`` and its 3x3 kernel the CIFAR stem (7x7 otherwise);
- a timm ViT: the patch size and the number of ``blocks`` name the registered ViT, the width
  (the patch projection's output channels) over that ViT's gives ``model.width_multiplier``.
  The number of heads is not in the weights: it is the registered ViT's, which must divide the
  width.

Only the built-in backbones (``RESNET_SPECS``, ``VIT_SPECS``) are recognised; for another
(a fork's registered backbone) the config's own fields stay and the loader names any mismatch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from moco_jax.interop import names_vit
from moco_jax.models.resnet import RESNET_SPECS, Bottleneck
from moco_jax.models.vit import VIT_SPECS


def backbone_fields(named: Mapping[str, Any], current: str) -> dict[str, Any]:
    """The ``config.model`` fields (``backbone``, ``width_multiplier``, ``cifar_stem``: False
    for a ViT, which has no stem) of the backbone whose tensors are ``named`` (official names,
    the encoder's prefix removed); ``current`` (the config's backbone) wins a tie. Empty if none
    fits."""
    if names_vit.has_vit_names(named):
        return _vit(named, current)
    if "conv1.weight" in named:
        return _resnet(named)
    return {}


def _indices(named: Mapping[str, Any], pattern: str) -> int:
    """How many distinct indices ``(\\d+)`` in ``pattern`` the names have."""
    return len({m.group(1) for name in named if (m := re.match(pattern, name))})


def _resnet(named: Mapping[str, Any]) -> dict[str, Any]:
    stages = [_indices(named, rf"layer{stage}\.(\d+)\.") for stage in range(1, 5)]
    bottleneck = "layer1.0.conv3.weight" in named
    conv1 = np.shape(named["conv1.weight"])  # [out, in, kh, kw]
    if len(conv1) != 4:
        return {}
    for name, (sizes, block) in RESNET_SPECS.items():
        if list(sizes) == stages and (block is Bottleneck) == bottleneck:
            return {
                "backbone": name,
                "width_multiplier": conv1[0] / 64,
                "cifar_stem": conv1[-1] == 3,
            }
    return {}


def _vit(named: Mapping[str, Any], current: str) -> dict[str, Any]:
    proj = np.shape(named.get("patch_embed.proj.weight", ()))  # [D, C, p, p]
    if len(proj) != 4:
        return {}
    dim, patch = proj[0], proj[-1]
    depth = _indices(named, r"blocks\.(\d+)\.")
    fits = [
        name
        for name, (p, _, d, heads) in VIT_SPECS.items()
        if (p, d) == (patch, depth) and dim % heads == 0  # the heads split the width
    ]
    if not fits:
        return {}
    choices = [name for name in fits if VIT_SPECS[name][1] == dim] or fits  # width 1 first
    name = current if current in choices else choices[0]
    return {"backbone": name, "width_multiplier": dim / VIT_SPECS[name][1], "cifar_stem": False}
