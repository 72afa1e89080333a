"""The official names of a whole encoder: its ResNet (``names_resnet``) or ViT (``names_vit``)
backbone with its projection head, and MoCo v3's predictor, both ways. Plain numpy, no torch.

The official code puts the projector where the classifier was: ``fc`` of a torchvision ResNet,
``head`` of a timm ViT. A head module ``fc`` (v1's Linear) is torch's ``fc`` / ``head`` itself;
``fc{i}`` is entry ``i`` of the official ``nn.Sequential``: v2's ``fc.0``, ``fc.2``; for the v3
MLPs of moco-v3's ``_build_mlp`` (Linear without bias, BatchNorm1d, ReLU, ..., last BatchNorm1d
with ``affine=False``) Linear ``3 l`` and BN ``3 l + 1`` of layer ``l``, so a 3-layer projector is
``0, 1, 3, 4, 6, 7`` and the affine-free last BN has only ``running_mean``, ``running_var`` and
``num_batches_tracked``. The predictor is the same kind of MLP, named ``predictor.*``.

Where these names sit in a file (``module.encoder_q.``, ``module.base_encoder.``, ...) is
``formats``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from moco_jax.interop import names_resnet, names_vit
from moco_jax.interop.arrays import checked_array, to_flax, to_torch
from moco_jax.interop.errors import WeightBridgeError

_HEAD_LEAF = re.compile(r"(\d+\.)?(weight|bias|running_mean|running_var|num_batches_tracked)")
_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def head_key(vit: bool) -> str:
    """Where the official code keeps the projector: ``head`` of a ViT, ``fc`` of a ResNet."""
    return "head" if vit else "fc"


def is_head_name(name: str, vit: bool) -> bool:
    key = head_key(vit)
    return name == key or name.startswith(f"{key}.")


def _index(module: str) -> int:
    return int(module[2:]) if module[2:].isdigit() else -1


def mlp_to_torch(params: Mapping, stats: Mapping, prefix: str) -> dict[str, np.ndarray]:
    """A Flax head or MLP (``fc``, ``fc0``, ``fc1``, ...) -> ``{prefix}.weight``,
    ``{prefix}.0.weight``, ``{prefix}.1.running_mean``, ..."""
    state_dict = {}
    for module in sorted({*params, *stats}, key=_index):
        name = prefix if module == "fc" else f"{prefix}.{module[2:]}"
        weights, running = params.get(module, {}), stats.get(module, {})
        if "kernel" in weights:  # Linear
            state_dict[f"{name}.weight"] = to_torch(weights["kernel"])
            if "bias" in weights:
                state_dict[f"{name}.bias"] = np.asarray(weights["bias"])
            continue
        for flax, torch in (("scale", "weight"), ("bias", "bias")):  # none: affine=False
            if flax in weights:
                state_dict[f"{name}.{torch}"] = np.asarray(weights[flax])
        state_dict[f"{name}.running_mean"] = np.asarray(running["mean"])
        state_dict[f"{name}.running_var"] = np.asarray(running["var"])
        state_dict[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    return state_dict


def torch_to_mlp(named: Mapping[str, Any], prefix: str) -> tuple[dict, dict]:
    """The inverse of ``mlp_to_torch``: ``(params, batch_stats)`` of the tensors named
    ``{prefix}.*``; a module with running statistics or a 1-D weight is a BatchNorm."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in named.items():
        rest = name[len(prefix) + 1 :] if name.startswith(f"{prefix}.") else ""
        match = _HEAD_LEAF.fullmatch(rest)
        if not match:
            raise WeightBridgeError(f"{name!r} is not a tensor of a MoCo projection head or MLP")
        module = f"fc{(match.group(1) or '')[:-1]}"
        leaf = match.group(2)
        modules.setdefault(module, {})[leaf] = checked_array(name, tensor, leaf)
    params: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    for module, leaves in modules.items():
        weight = leaves.get("weight")
        where = f"{prefix}.{module[2:]}" if module != "fc" else prefix
        if "running_mean" in leaves or (weight is not None and weight.ndim == 1):
            if "running_mean" not in leaves or "running_var" not in leaves:
                raise WeightBridgeError(f"BatchNorm {where!r} lacks running_mean or running_var")
            stats[module] = {flax: leaves[torch] for torch, flax in _BN_STATS.items()}
            affine = {"scale": weight, "bias": leaves.get("bias")}
            affine = {key: value for key, value in affine.items() if value is not None}
            if affine:
                params[module] = affine
        elif weight is not None and weight.ndim == 2 and set(leaves) <= {"weight", "bias"}:
            params[module] = {"kernel": to_flax(weight)}
            if "bias" in leaves:
                params[module]["bias"] = leaves["bias"]
        else:
            shapes = {leaf: list(value.shape) for leaf, value in leaves.items()}
            raise WeightBridgeError(f"{where!r} is neither a Linear nor a BatchNorm: {shapes}")
    return params, stats


def encoder_to_torch(
    variables: Mapping[str, Any], image_size: Any = None, prefix: str = "", head: bool = True
) -> dict[str, np.ndarray]:
    """``{'params', 'batch_stats'}`` of a backbone (+ ``head``) -> official torch names: a
    torchvision ResNet's with the head as ``fc``, or timm's ViT (``pos_embed`` of ``image_size``,
    needed for a ViT) with the head as ``head``."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    vit = names_vit.is_vit(params["backbone"])
    if vit:
        if image_size is None:
            raise ValueError("a ViT's export needs the image size (its pos_embed)")
        state_dict = names_vit.vit_to_timm(params["backbone"], image_size, prefix)
    else:
        backbone = {"params": {"backbone": params["backbone"]}}
        backbone["batch_stats"] = {"backbone": stats.get("backbone", {})}
        state_dict = names_resnet.flax_to_torch(backbone, prefix)
    if head and "head" in params:
        head_stats = stats.get("head", {})
        state_dict.update(mlp_to_torch(params["head"], head_stats, prefix + head_key(vit)))
    return state_dict


def torch_to_encoder(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, dict]:
    """The inverse of ``encoder_to_torch`` for the names under ``prefix``: ``{'params':
    {'backbone', 'head'?}, 'batch_stats': {...}}``, a ResNet or a ViT as the names say."""
    named = {}
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise WeightBridgeError(f"state dict key {name!r} is not a tensor name")
        if name.startswith(prefix):
            named[name] = tensor
    if not named:
        raise WeightBridgeError(f"no tensor name starts with {prefix!r}")
    vit = names_vit.has_vit_names(name[len(prefix) :] for name in named)
    head = {n: t for n, t in named.items() if is_head_name(n[len(prefix) :], vit)}
    backbone = {n: t for n, t in named.items() if n not in head}
    if vit:
        variables: dict[str, dict] = {
            "params": {"backbone": names_vit.timm_to_vit(backbone, prefix)}
        }
        variables["batch_stats"] = {}
    else:
        variables = names_resnet.torch_to_flax(backbone, prefix)
    if head:
        head_params, head_stats = torch_to_mlp(head, prefix + head_key(vit))
        variables["params"]["head"] = head_params
        if head_stats:
            variables["batch_stats"]["head"] = head_stats
    return variables
