"""timm's ViT state-dict names for the backbone of ``models/vit.py``, both ways, without torch.

The names and their order are those of timm's ``VisionTransformer`` as moco-v3's ``vits.py``
builds it (``state_dict()`` lists a module's own parameters, then its submodules'):
``cls_token [1, 1, D]``, ``pos_embed [1, 1 + h * w, D]``, ``patch_embed.proj.weight [D, C, p, p]``
and ``.bias``, then per block ``blocks.i.`` ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1``, ``mlp.fc2`` (each ``weight`` then ``bias``), then ``norm``. A Linear ``weight`` is
the Flax ``kernel`` transposed, the patch projection's is the Conv kernel ``[p, p, C, D]``
transposed to ``[D, C, p, p]`` (the layouts: ``arrays``), a LayerNorm's ``weight`` is the Flax
``scale``.

``pos_embed`` is no Flax parameter (``models/vit.py``): exporting writes MoCo v3's fixed 2-D
sin-cos table for the image size, and importing checks that a file's ``pos_embed`` is that table
(of the square grid its length gives) and drops it; a learned embedding (timm's or DeiT's own
ViTs) is refused, since this ViT cannot hold one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from moco_jax.interop.arrays import checked_array, to_flax, to_torch
from moco_jax.interop.errors import WeightBridgeError
from moco_jax.models.vit import flax_path, sincos_position_embedding

BLOCK_MODULES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
TIMM_VIT_NAME = re.compile(
    r"cls_token|pos_embed|(patch_embed\.proj|blocks\.\d+\.(norm[12]|attn\.(qkv|proj)|mlp\.fc[12])"
    r"|norm)\.(weight|bias)"
)
# Some of these is in every timm ViT state dict and in no torchvision ResNet's.
VIT_MARKERS = ("cls_token", "pos_embed", "patch_embed.proj.weight")
POS_EMBED_TOLERANCE = 1e-4  # float32 sin/cos of torch and numpy may differ in the last bits


def is_vit(backbone_params: Mapping[str, Any]) -> bool:
    """Whether a Flax backbone's params are a ViT's (``models/vit.py``)."""
    return "patch_embed" in backbone_params


def has_vit_names(names: Any) -> bool:
    """Whether a state dict's names (prefix removed) are a ViT's."""
    return any(name in VIT_MARKERS for name in names)


def timm_modules(depth: int) -> Iterator[str]:
    """The modules with a weight and a bias, in timm's order."""
    yield "patch_embed.proj"
    for index in range(depth):
        yield from (f"blocks.{index}.{module}" for module in BLOCK_MODULES)
    yield "norm"


def _depth(params: Mapping[str, Any]) -> int:
    return sum(1 for name in params if re.fullmatch(r"blocks_\d+", name))


def patch_size(params: Mapping[str, Any]) -> int:
    return int(np.shape(params["patch_embed"]["proj"]["kernel"])[0])


def vit_to_timm(
    params: Mapping[str, Any], image_size: int | tuple[int, int], prefix: str = ""
) -> dict[str, np.ndarray]:
    """A Flax ViT backbone's ``params`` -> timm's state dict (``pos_embed`` for ``image_size``)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    patch = patch_size(params)
    if height % patch or width % patch:
        raise WeightBridgeError(f"image size {height}x{width} is not a multiple of patch {patch}")
    cls_token = np.asarray(params["cls_token"])
    pos_embed = sincos_position_embedding(height // patch, width // patch, cls_token.shape[-1])
    state_dict = {f"{prefix}cls_token": cls_token, f"{prefix}pos_embed": pos_embed}
    for module in timm_modules(_depth(params)):
        for leaf in ("weight", "bias"):
            node = params
            for key in flax_path(f"{module}.{leaf}"):
                node = node[key]
            state_dict[f"{prefix}{module}.{leaf}"] = to_torch(node)
    expected = sum(1 for _ in _leaves(params))
    if len(state_dict) - 1 != expected:  # every Flax leaf, plus pos_embed
        raise WeightBridgeError(f"ViT params hold {expected} arrays, timm's names cover fewer")
    return state_dict


def _leaves(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key)


def check_pos_embed(name: str, value: np.ndarray) -> None:
    """``WeightBridgeError`` unless ``value`` is MoCo v3's sin-cos table of a square grid."""
    shape = list(value.shape)
    if value.ndim != 3 or shape[0] != 1 or shape[1] < 2:
        raise WeightBridgeError(f"{name!r} is {shape}, not a position embedding [1, 1 + h * w, D]")
    side = math.isqrt(shape[1] - 1)
    if side * side != shape[1] - 1:
        raise WeightBridgeError(f"{name!r} has {shape[1] - 1} patch rows: not a square grid")
    try:
        table = sincos_position_embedding(side, side, shape[2])
    except ValueError as err:
        raise WeightBridgeError(f"{name!r}: {err}") from err
    difference = float(np.max(np.abs(value.astype(np.float64) - table)))
    if not difference <= POS_EMBED_TOLERANCE:
        raise WeightBridgeError(
            f"{name!r} is not MoCo v3's fixed 2-D sin-cos position embedding of a {side}x{side} "
            f"grid (differs by up to {difference:.3g}): this ViT has no learned position "
            f"embedding, so it cannot take one (timm's or DeiT's own ViTs learn theirs)"
        )


def timm_to_vit(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The Flax ViT backbone ``params`` of the timm-named tensors under ``prefix`` (every name
    checked; ``pos_embed`` checked to be the fixed table and dropped)."""
    params: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise WeightBridgeError(f"state dict key {name!r} is not a tensor name")
        if not name.startswith(prefix):
            continue
        short = name[len(prefix) :]
        if not TIMM_VIT_NAME.fullmatch(short):
            raise WeightBridgeError(f"{name!r} is not a tensor of MoCo v3's (timm's) ViT")
        value = checked_array(name, tensor, short)
        if short == "pos_embed":
            check_pos_embed(name, value)
            continue
        *modules, leaf = flax_path(short)
        node = params
        for key in modules:
            node = node.setdefault(key, {})
        node[leaf] = value if short == "cls_token" else to_flax(value)
    if "patch_embed" not in params:
        raise WeightBridgeError(f"no patch_embed.proj tensors under {prefix!r}: not a ViT")
    return params
