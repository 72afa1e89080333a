"""The three file layouts weights leave moco_jax in, and reading them (and torchvision's) back.

``torchvision``: a state dict with torchvision's ResNet names and shapes, ``num_batches_tracked``
included, no projection head. ``torchvision.models.resnet50()`` loads it with ``strict=False``
missing only ``fc.weight``/``fc.bias`` (the rule of the official ``main_lincls.py``); a linear
evaluation's classifier, when given, becomes that ``fc``.

``detectron2``: what the official ``detection/convert-pretrain-to-detectron2.py`` writes from a
MoCo checkpoint: a plain pickle of ``{"model": {name: numpy array}, "__author__": "MOCO",
"matching_heuristics": True}`` holding the query encoder (head included, as the script keeps
it), renamed by the script's rules: a name without ``layer`` gets ``stem.``; ``layer1..4`` become
``res2..5``; ``bn1..3`` become ``conv1..3.norm``; ``downsample.0`` -> ``shortcut``;
``downsample.1`` -> ``shortcut.norm``.

``moco``: the checkpoint of the official ``main_moco.py``: ``{"epoch", "arch", "state_dict"}``
with ``module.encoder_q.*``, ``module.encoder_k.*``, ``module.queue`` ``[dim, K]`` and
``module.queue_ptr``, which the official ``main_lincls.py`` and detection converter accept.

Reading: ``read_state_dict`` takes any of the three, a torchvision state dict (bare, under
``state_dict``, or with DataParallel's ``module.`` prefix) or an official MoCo ``.pth.tar``, and
gives torchvision-named tensors; ``encoder_variables`` picks the encoder out of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from moco_jax import torch_bridge
from moco_jax.torch_bridge import MOCO_PREFIX, WeightBridgeError

FORMATS = ("torchvision", "detectron2", "moco")
QUERY_PREFIX = f"{MOCO_PREFIX}encoder_q."
DETECTRON2_AUTHOR = "MOCO"


# --- Writing. ---


def torchvision_state_dict(
    encoder: Mapping[str, Any], classifier: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """torchvision's names for the backbone of ``encoder`` (``{'params', 'batch_stats'}``), and
    ``fc`` from a linear classifier (``{'kernel': [F, classes], 'bias': [classes]}``) if given."""
    backbone = {
        collection: {"backbone": encoder[collection]["backbone"]}
        for collection in ("params", "batch_stats")
        if "backbone" in encoder.get(collection, {})
    }
    state_dict = torch_bridge.flax_to_torch(backbone)
    if classifier is not None:
        state_dict["fc.weight"] = np.ascontiguousarray(np.asarray(classifier["kernel"]).T)
        state_dict["fc.bias"] = np.asarray(classifier["bias"])
    return state_dict


def moco_checkpoint(
    query: Mapping[str, Any],
    key: Mapping[str, Any],
    queue: Any,
    queue_ptr: int,
    arch: str,
    epoch: int,
) -> dict[str, Any]:
    """The official ``main_moco.py`` checkpoint (without its optimizer state)."""
    state_dict = torch_bridge.flax_to_moco_checkpoint(query, key, np.asarray(queue), queue_ptr)
    return {"epoch": int(epoch), "arch": arch, "state_dict": state_dict}


def detectron2_name(torch_name: str) -> str:
    """A query-encoder tensor's name as the official detectron2 converter renames it."""
    name = torch_name
    if "layer" not in name:
        name = "stem." + name
    for stage in (1, 2, 3, 4):
        name = name.replace(f"layer{stage}", f"res{stage + 1}")
    for index in (1, 2, 3):
        name = name.replace(f"bn{index}", f"conv{index}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_model(encoder: Mapping[str, Any]) -> dict[str, Any]:
    """The converter's pickle of the query encoder ``encoder`` (``{'params', 'batch_stats'}``)."""
    state_dict = torch_bridge.flax_to_torch(encoder)
    model = {detectron2_name(name): value for name, value in state_dict.items()}
    return {"model": model, "__author__": DETECTRON2_AUTHOR, "matching_heuristics": True}


# --- Reading. ---

_D2_STAGE = re.compile(r"res([2-5])\.(.*)")


def torch_name_from_detectron2(name: str) -> str:
    """The inverse of ``detectron2_name`` (``WeightBridgeError`` for a name it never writes)."""
    if not isinstance(name, str):
        raise WeightBridgeError(f"detectron2 model key {name!r} is not a tensor name")
    stage = _D2_STAGE.fullmatch(name)
    if name.startswith("stem."):
        rest = name[len("stem.") :]
    elif stage:
        rest = f"layer{int(stage.group(1)) - 1}.{stage.group(2)}"
    else:
        raise WeightBridgeError(
            f"{name!r} is not a name the MoCo detectron2 converter writes (stem.*, res2-5.*)"
        )
    rest = rest.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    return re.sub(r"conv([1-3])\.norm", r"bn\1", rest)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """``(torchvision-named state dict, what the file is)`` of a ``.pth``/``.pth.tar`` (read with
    ``weights_only=True``) or of the detectron2 converter's ``.pkl`` (numpy arrays only)."""
    if torch_bridge.is_torch_file(path):
        state_dict = torch_bridge.load_torch_file(path)
        if any(isinstance(k, str) and k.startswith(QUERY_PREFIX) for k in state_dict):
            return state_dict, "an official MoCo checkpoint"
        return state_dict, "a torchvision state dict"
    payload = torch_bridge.load_pickle_file(path)
    if not isinstance(payload, Mapping):
        raise WeightBridgeError(
            f"{path}: expected a dict of arrays, found {type(payload).__name__}"
        )
    if "model" not in payload:
        return dict(payload), "a pickled state dict"
    model = payload["model"]
    if not isinstance(model, Mapping):
        raise WeightBridgeError(f"{path}: 'model' holds a {type(model).__name__}, not a dict")
    return {torch_name_from_detectron2(k): v for k, v in model.items()}, "a detectron2 pickle"


def encoder_prefix(state_dict: Mapping[str, Any]) -> str:
    """Where the encoder's tensors are: ``module.encoder_q.`` (official MoCo), ``module.``
    (DataParallel) or nothing (torchvision)."""
    names = [name for name in state_dict if isinstance(name, str)]
    if any(name.startswith(QUERY_PREFIX) for name in names):
        return QUERY_PREFIX
    if names and all(name.startswith(MOCO_PREFIX) for name in names):
        return MOCO_PREFIX
    return ""


def encoder_variables(state_dict: Mapping[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
    """``({'params', 'batch_stats'}, {torchvision name: tensor})`` of the encoder in
    ``state_dict``: the query encoder of a MoCo checkpoint; every tensor is checked."""
    prefix = encoder_prefix(state_dict)
    variables = torch_bridge.torch_to_flax(state_dict, prefix)
    named = {
        name[len(prefix) :]: value
        for name, value in state_dict.items()
        if isinstance(name, str) and name.startswith(prefix)
    }
    return variables, named
