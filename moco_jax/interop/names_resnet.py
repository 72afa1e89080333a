"""torchvision's ResNet names for the backbone of ``models/resnet.py`` (and a MoCo v1/v2 head
kept as torchvision's ``fc``), both ways. Plain numpy: state dicts here are ``{name: array}``.

Name mapping (Flax path <-> torch name):
  ``backbone/conv1/kernel [H,W,I,O]``          <-> ``conv1.weight [O,I,H,W]``
  ``backbone/layer2_0/downsample_conv/kernel`` <-> ``layer2.0.downsample.0.weight``
  ``backbone/layer2_0/downsample_bn/scale``    <-> ``layer2.0.downsample.1.weight``
  ``bn*/scale, bias`` and batch stats ``mean, var`` <-> ``weight, bias, running_mean, running_var``
  ``head/fc`` (v1) <-> ``fc``;  ``head/fc0``, ``head/fc2`` (v2 MLP) <-> ``fc.0``, ``fc.2``
  Dense ``kernel [in,out]`` <-> ``weight [out,in]`` (the layouts: ``arrays``).
``num_batches_tracked`` carries no weight: it is dropped on import and written as 0 on export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from moco_jax.interop.arrays import checked_array, to_flax, to_torch
from moco_jax.interop.errors import WeightBridgeError

_BN_TORCH_TO_FLAX = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_BN_FLAX_TO_TORCH = {flax: torch for torch, flax in _BN_TORCH_TO_FLAX.items()}


def _is_bn(module: str) -> bool:
    return module.startswith("bn") or module == "downsample_bn"


def _torch_module_to_flax(parts: list[str]) -> list[str]:
    """``['layer1', '0', 'downsample', '1']`` -> ``['backbone', 'layer1_0', 'downsample_bn']``."""
    if parts[0] == "fc":
        if len(parts) == 1:
            return ["head", "fc"]
        if len(parts) == 2 and parts[1] in ("0", "2"):
            return ["head", f"fc{parts[1]}"]
        raise WeightBridgeError(f"unexpected head module {'.'.join(parts)!r}")
    out = ["backbone"]
    i = 0
    while i < len(parts):
        part = parts[i]
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if part.startswith("layer") and nxt is not None and nxt.isdigit():
            out.append(f"{part}_{nxt}")
            i += 2
        elif part == "downsample" and nxt in ("0", "1"):
            out.append("downsample_conv" if nxt == "0" else "downsample_bn")
            i += 2
        else:
            out.append(part)
            i += 1
    return out


def _flax_module_to_torch(path: list[str]) -> str:
    parts = []
    for name in path[1:]:  # drop 'backbone' / 'head'
        if name.startswith("layer") and "_" in name:
            parts.extend(name.split("_", 1))
        elif name == "downsample_conv":
            parts.extend(["downsample", "0"])
        elif name == "downsample_bn":
            parts.extend(["downsample", "1"])
        elif path[0] == "head" and name in ("fc0", "fc2"):
            parts.extend(["fc", name[2]])
        else:
            parts.append(name)
    return ".".join(parts)


def _set(tree: dict, path: list[str], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if path[-1] in tree:
        raise WeightBridgeError(f"two tensors map to {'/'.join(path)}")
    tree[path[-1]] = value


# The module names a torchvision ResNet (with a MoCo head) has: anything else is not its tensor.
_RESNET_MODULE = re.compile(
    r"(conv1|bn1|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01])|fc(\.[02])?)"
)


def torch_to_flax(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, dict]:
    """A torchvision-named ResNet (+ MoCo head) state dict -> ``{'params', 'batch_stats'}``.

    Only names starting with ``prefix`` are taken (e.g. ``'module.encoder_q.'``). A key that is
    not a string, a value that is not a floating-point tensor, NaN or infinite weights and a name
    a ResNet does not have (``layer9.0.conv1.weight``) are refused with the name.
    """
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise WeightBridgeError(f"state dict key {name!r} is not a tensor name")
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split(".")
        *module_parts, leaf = parts
        if not module_parts or not _RESNET_MODULE.fullmatch(".".join(module_parts)):
            raise WeightBridgeError(f"{name!r} is not a tensor of a torchvision ResNet")
        value = checked_array(name, tensor, leaf)
        if leaf == "num_batches_tracked":
            continue
        module = _torch_module_to_flax(module_parts)
        if _is_bn(module[-1]):
            if leaf not in _BN_TORCH_TO_FLAX:
                raise WeightBridgeError(f"unexpected BatchNorm tensor {name!r}")
            collection, flax_leaf = _BN_TORCH_TO_FLAX[leaf]
            _set(variables[collection], [*module, flax_leaf], value)
        elif leaf == "weight":
            if value.ndim not in (2, 4):  # a Linear's or a convolution's
                raise WeightBridgeError(f"{name!r} has unexpected shape {value.shape}")
            _set(variables["params"], [*module, "kernel"], to_flax(value))
        elif leaf == "bias":
            _set(variables["params"], [*module, "bias"], value)
        else:
            raise WeightBridgeError(f"unexpected tensor {name!r}")
    if not variables["params"]:
        raise WeightBridgeError(f"no tensor name starts with {prefix!r}")
    return variables


def _flatten(tree: Mapping, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*path, key)))
        else:
            flat[(*path, key)] = value
    return flat


_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _torchvision_order(name: str) -> tuple:
    """Sort key giving torchvision's registration order: conv1, bn1, layer1.., fc."""
    key = []
    for part in name.split("."):
        if part in _LEAF_ORDER:
            key.append((9, _LEAF_ORDER.index(part), ""))
        elif part.isdigit():
            key.append((0, int(part), ""))
        elif re.fullmatch(r"(conv|bn)\d+", part):
            number = int(re.sub(r"\D", "", part))
            key.append((1, 2 * number + part.startswith("bn"), ""))
        else:
            rank = {"layer": 2, "downsample": 3, "fc": 4}
            prefix = next((r for p, r in rank.items() if part.startswith(p)), 5)
            key.append((prefix, 0, part))
    return tuple(key)


def flax_to_torch(variables: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """``{'params', 'batch_stats'}`` -> torchvision-named state dict of numpy arrays."""
    state_dict: dict[str, np.ndarray] = {}
    flat = {("params", *k): v for k, v in _flatten(variables["params"]).items()}
    flat.update(
        {("batch_stats", *k): v for k, v in _flatten(variables.get("batch_stats", {})).items()}
    )
    bn_modules = set()
    for (collection, *path), value in flat.items():
        *module, leaf = path
        name = prefix + _flax_module_to_torch(module)
        value = np.asarray(value)
        if _is_bn(module[-1]):
            state_dict[f"{name}.{_BN_FLAX_TO_TORCH[(collection, leaf)]}"] = value
            bn_modules.add(name)
        elif leaf == "kernel":
            state_dict[f"{name}.weight"] = to_torch(value)
        else:
            state_dict[f"{name}.{leaf}"] = value
    for name in bn_modules:
        state_dict[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    prefix_len = len(prefix)
    return {
        k: state_dict[k]
        for k in sorted(state_dict, key=lambda k: _torchvision_order(k[prefix_len:]))
    }
