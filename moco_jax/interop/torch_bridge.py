"""Weights across the PyTorch/Flax border: torchvision ResNet names and official MoCo checkpoints.

State dicts here are plain ``{name: numpy array}`` mappings, so converting needs no torch; only
reading or writing a ``.pth``/``.pth.tar`` file does (``load_torch_file``, ``save_torch_file``).
Reading never runs a file's code: torch files load with ``weights_only=True`` and plain pickles
(detectron2's ``.pkl``) with an unpickler that builds numpy arrays and nothing else.
The layouts of whole files (torchvision, detectron2, official MoCo, DeiT) are ``torch_formats.py``;
timm's ViT names are ``vit_names.py``, MoCo v3's heads and checkpoint ``torch_encoders.py``.

Name mapping (Flax path <-> torch name):
  ``backbone/conv1/kernel [H,W,I,O]``          <-> ``conv1.weight [O,I,H,W]``
  ``backbone/layer2_0/downsample_conv/kernel`` <-> ``layer2.0.downsample.0.weight``
  ``backbone/layer2_0/downsample_bn/scale``    <-> ``layer2.0.downsample.1.weight``
  ``bn*/scale, bias`` and batch stats ``mean, var`` <-> ``weight, bias, running_mean, running_var``
  ``head/fc`` (v1) <-> ``fc``;  ``head/fc0``, ``head/fc2`` (v2 MLP) <-> ``fc.0``, ``fc.2``
  Dense ``kernel [in,out]`` <-> ``weight [out,in]``.
``num_batches_tracked`` carries no weight: it is dropped on import and written as 0 on export.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from moco_jax.config.checks import ConfigError

MOCO_PREFIX = "module."
ENCODERS = ("encoder_q", "encoder_k")
_BN_TORCH_TO_FLAX = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_BN_FLAX_TO_TORCH = {flax: torch for torch, flax in _BN_TORCH_TO_FLAX.items()}


class WeightBridgeError(ConfigError):
    """A weights file or state dict that cannot be read, or whose names or shapes do not fit."""


class TorchMissing(WeightBridgeError, ImportError):
    """PyTorch, an optional extra, is not installed (a one-line error of the command lines)."""


def require_torch(purpose: str) -> Any:
    """The ``torch`` module, or ``TorchMissing`` saying how to install it for ``purpose``."""
    try:
        import torch
    except ImportError as err:
        raise TorchMissing(
            f"{purpose} needs PyTorch, an optional extra used only at that moment: "
            f"pip install torch (the CPU build is enough)"
        ) from err
    return torch


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


def checked_array(name: Any, tensor: Any, leaf: str) -> np.ndarray:
    """``tensor`` as a numpy array, or ``WeightBridgeError`` naming what is wrong with it."""
    if not hasattr(tensor, "shape") or not hasattr(tensor, "dtype"):
        raise WeightBridgeError(f"{name!r} holds a {type(tensor).__name__}, not a tensor")
    value = np.asarray(tensor)
    if leaf != "num_batches_tracked" and not np.issubdtype(value.dtype, np.floating):
        raise WeightBridgeError(f"{name!r} has dtype {value.dtype}; weights must be floating point")
    if leaf != "num_batches_tracked" and not np.isfinite(value).all():
        raise WeightBridgeError(f"{name!r} holds NaN or infinite values")
    return value


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
            if value.ndim == 4:
                kernel = value.transpose(2, 3, 1, 0)
            elif value.ndim == 2:
                kernel = value.T
            else:
                raise WeightBridgeError(f"{name!r} has unexpected shape {value.shape}")
            _set(variables["params"], [*module, "kernel"], np.ascontiguousarray(kernel))
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
            weight = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            state_dict[f"{name}.weight"] = np.ascontiguousarray(weight)
        else:
            state_dict[f"{name}.{leaf}"] = value
    for name in bn_modules:
        state_dict[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    prefix_len = len(prefix)
    return {
        k: state_dict[k]
        for k in sorted(state_dict, key=lambda k: _torchvision_order(k[prefix_len:]))
    }


def moco_checkpoint_to_flax(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An official MoCo checkpoint's ``state_dict`` -> both encoders' variables and the queue.

    Returns ``{'encoder_q': variables, 'encoder_k': variables, 'queue': [K, D] or None,
    'queue_ptr': int or None}``; the official queue is stored ``[D, K]``.
    """
    result: dict[str, Any] = {
        encoder: torch_to_flax(state_dict, f"{MOCO_PREFIX}{encoder}.") for encoder in ENCODERS
    }
    queue = state_dict.get(f"{MOCO_PREFIX}queue")
    result["queue"] = None if queue is None else np.ascontiguousarray(np.asarray(queue).T)
    ptr = state_dict.get(f"{MOCO_PREFIX}queue_ptr")
    result["queue_ptr"] = None if ptr is None else int(np.asarray(ptr).reshape(-1)[0])
    return result


def flax_to_moco_checkpoint(
    query_variables: Mapping[str, Any],
    key_variables: Mapping[str, Any],
    queue: np.ndarray,
    queue_ptr: int,
) -> dict[str, np.ndarray]:
    """The inverse of ``moco_checkpoint_to_flax``: official names, queue as ``[D, K]``."""
    state_dict = flax_to_torch(query_variables, f"{MOCO_PREFIX}encoder_q.")
    state_dict.update(flax_to_torch(key_variables, f"{MOCO_PREFIX}encoder_k."))
    state_dict[f"{MOCO_PREFIX}queue"] = np.ascontiguousarray(np.asarray(queue).T)
    state_dict[f"{MOCO_PREFIX}queue_ptr"] = np.asarray([queue_ptr], np.int64)
    return state_dict


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.pth``/``.pth.tar`` file's state dict as numpy arrays, without running its code.

    Accepts a bare state dict, a training checkpoint holding one under ``'state_dict'`` or a
    DeiT-format file holding one under ``'model'``.
    Needs torch (the optional extra) at this moment only.
    """
    torch = require_torch("reading .pth files")
    if os.path.isdir(path):
        raise WeightBridgeError(f"{path} is a directory, not a .pth file")
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors
        raise WeightBridgeError(
            f"{path}: not a plain weights file (refused to unpickle code objects): "
            f"{str(err).splitlines()[0][:200]}"
        ) from err
    except Exception as err:  # a truncated or damaged archive
        raise WeightBridgeError(
            f"{path} is not a complete PyTorch file (truncated or damaged): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from err
    if isinstance(payload, Mapping) and "state_dict" in payload:
        payload = payload["state_dict"]
    elif isinstance(payload, Mapping) and isinstance(payload.get("model"), Mapping):
        payload = payload["model"]  # DeiT's layout (moco-v3's convert_to_deit.py writes it)
    if not isinstance(payload, Mapping):
        raise WeightBridgeError(f"{path}: expected a state dict, found {type(payload).__name__}")
    arrays = {}
    for name, tensor in payload.items():
        if not isinstance(tensor, torch.Tensor):
            kind = type(tensor).__name__
            raise WeightBridgeError(f"{path}: {name!r} holds a {kind}, not a tensor")
        arrays[name] = tensor.detach().cpu().numpy()
    return arrays


def save_torch_file(payload: Mapping[str, Any]) -> bytes:
    """``payload`` (numpy arrays, possibly under ``'state_dict'``; ints and strings) as the bytes
    of a ``torch.save`` file: arrays become tensors. Needs torch at this moment only."""
    torch = require_torch("writing .pth files")

    def as_torch(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: as_torch(item) for key, item in value.items()}
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.array(value))  # a writable copy; 0-d stays 0-d
        return value

    buffer = io.BytesIO()
    torch.save(as_torch(payload), buffer)
    return buffer.getvalue()


# torch.save's old (pre-1.6) format starts with this number, pickled with protocol 2; the
# current one is a zip archive. Anything else is read as a plain pickle (detectron2's .pkl).
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
_ZIP_MAGIC = b"PK\x03\x04"


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` was written by ``torch.save`` (either format), from its first bytes."""
    path = epath.Path(path)
    if path.is_dir():
        return False
    with path.open("rb") as file:
        head = file.read(len(_LEGACY_TORCH_MAGIC))
    return head.startswith(_ZIP_MAGIC) or head == _LEGACY_TORCH_MAGIC


class _Refused(pickle.UnpicklingError):
    """A pickle names a class or function other than numpy's array builders."""


class _ArraysOnly(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; any other class or function a
    pickle names (``os.system``, ``eval``, ...) is refused before it can be called."""

    ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"refused to load {module}.{name}: a weights file holds arrays")


def load_pickle_file(path: str | os.PathLike) -> Any:
    """A plain pickle of numpy arrays (detectron2's ``.pkl``), without running any code."""
    path = epath.Path(path)
    if path.is_dir():
        raise WeightBridgeError(f"{path} is a directory, not a weights file")
    data = path.read_bytes()
    try:
        return _ArraysOnly(io.BytesIO(data)).load()
    except _Refused as err:
        raise WeightBridgeError(f"{path}: not a plain weights file ({err})") from err
    except Exception as err:  # truncated, or not a pickle at all
        raise WeightBridgeError(
            f"{path} is neither a PyTorch file nor a complete pickle of arrays: "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        ) from err
