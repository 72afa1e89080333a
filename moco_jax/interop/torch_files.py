"""Weights files on disk: reading and writing them, without running a file's code. The only
module of moco_jax that imports torch, and only at the moment a ``.pth`` is read or written
(``require_torch``: torch is an optional extra).

- ``load_torch_file``: a ``.pth``/``.pth.tar`` read with ``torch.load(..., weights_only=True)``,
  which refuses anything but tensors and plain containers; its state dict as numpy arrays.
- ``load_pickle_file``: a plain pickle (detectron2's ``.pkl``) read by an unpickler that builds
  numpy arrays and nothing else (``os.system``, ``eval``, any other class or function: refused).
- ``is_torch_file``: which of the two a file is, from its first bytes.
- ``save_torch_file``: numpy arrays as the bytes of a ``torch.save`` file.

What the arrays mean (names, layouts, whole checkpoints) is the layers above: ``formats``.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from moco_jax.interop.errors import WeightBridgeError


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
