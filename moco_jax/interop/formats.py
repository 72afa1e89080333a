"""The kinds of weights file, top layer of the PyTorch border: which kind a file is, and the
layout of each kind, for reading and writing. Below it: the names (``names_encoder`` on
``names_resnet`` and ``names_vit``), the array layouts (``arrays``) and the files on disk
(``torch_files``, the only module that imports torch). A file is read or written in one pass
down these layers; none of them calls back up.

Writing (``python -m moco_jax.export --format``, ``FORMATS``):

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
``module.queue_ptr``, which the official ``main_lincls.py`` and detection converter accept. For
MoCo v3, moco-v3's ``main_moco.py`` checkpoint: ``module.base_encoder.*`` (backbone with the
projector as ``fc`` of a ResNet, ``head`` of a ViT), ``module.momentum_encoder.*`` (the same
names), ``module.predictor.*``, no queue, for moco-v3's ``main_lincls.py`` and
``convert_to_deit.py``.

``deit``: what moco-v3's ``convert_to_deit.py`` writes for a ViT: ``{"model": state dict}`` of
the base encoder with timm's names (``names_vit``, ``pos_embed`` included) and no ``head``;
a linear evaluation's classifier, when given, becomes that ``head``.

Reading: ``read_state_dict`` takes any of these, a torchvision state dict or a timm ViT's (bare,
under ``state_dict`` or ``model``, or with DataParallel's ``module.`` prefix) or an official MoCo
v1/v2/v3 ``.pth.tar``; ``read_encoder`` also converts the (query / base) encoder in it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from moco_jax import storage
from moco_jax.interop import names_encoder, names_vit, torch_files
from moco_jax.interop.arrays import to_torch
from moco_jax.interop.errors import WeightBridgeError

FORMATS = ("torchvision", "detectron2", "moco", "deit")
MOCO_PREFIX = "module."  # DataParallel's, as the official checkpoints are saved
QUERY_PREFIX = f"{MOCO_PREFIX}encoder_q."
KEY_PREFIX = f"{MOCO_PREFIX}encoder_k."
BASE_PREFIX = f"{MOCO_PREFIX}base_encoder."
MOMENTUM_PREFIX = f"{MOCO_PREFIX}momentum_encoder."
PREDICTOR_PREFIX = f"{MOCO_PREFIX}predictor."
V1_V2_CHECKPOINT, V3_CHECKPOINT = "an official MoCo checkpoint", "an official MoCo v3 checkpoint"
DETECTRON2_AUTHOR = "MOCO"


# --- Writing. ---


def torchvision_state_dict(
    encoder: Mapping[str, Any], classifier: Mapping[str, Any] | None = None, image_size: Any = None
) -> dict[str, np.ndarray]:
    """The official names for the backbone of ``encoder`` (``{'params', 'batch_stats'}``):
    torchvision's of a ResNet, timm's of a ViT (``pos_embed`` of ``image_size``), and the
    classifier's place (``fc`` / ``head``) from a linear classifier (``{'kernel': [F, classes],
    'bias': [classes]}``) if given."""
    state_dict = names_encoder.encoder_to_torch(encoder, image_size, head=False)
    if classifier is not None:
        key = names_encoder.head_key(names_vit.is_vit(encoder["params"]["backbone"]))
        state_dict[f"{key}.weight"] = to_torch(classifier["kernel"])
        state_dict[f"{key}.bias"] = np.asarray(classifier["bias"])
    return state_dict


def deit_model(
    encoder: Mapping[str, Any], image_size: Any, classifier: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """convert_to_deit.py's ``{'model': ...}`` of a ViT encoder (the classifier as ``head``)."""
    return {"model": torchvision_state_dict(encoder, classifier, image_size)}


def moco_checkpoint(
    query: Mapping[str, Any],
    key: Mapping[str, Any],
    queue: Any,
    queue_ptr: int,
    arch: str,
    epoch: int,
    image_size: Any = None,
) -> dict[str, Any]:
    """The official ``main_moco.py`` checkpoint (without its optimizer state); a ViT's encoders
    (``image_size`` for their ``pos_embed``) have timm's names with the head as ``head``."""
    state_dict = {}
    for prefix, encoder in ((QUERY_PREFIX, query), (KEY_PREFIX, key)):
        state_dict.update(names_encoder.encoder_to_torch(encoder, image_size, prefix))
    state_dict[f"{MOCO_PREFIX}queue"] = np.ascontiguousarray(np.asarray(queue).T)  # [dim, K]
    state_dict[f"{MOCO_PREFIX}queue_ptr"] = np.asarray([queue_ptr], np.int64)
    return {"epoch": int(epoch), "arch": arch, "state_dict": state_dict}


def moco_v3_checkpoint(
    base: Mapping[str, Any],
    momentum: Mapping[str, Any],
    predictor: Mapping[str, Any],
    image_size: Any,
    arch: str,
    epoch: int,
) -> dict[str, Any]:
    """moco-v3's ``main_moco.py`` checkpoint (without its optimizer and scaler state) of the
    base and momentum encoders (``{'params', 'batch_stats'}`` of backbone + ``head``) and the
    predictor (``{'params', 'batch_stats'}``)."""
    state_dict = names_encoder.encoder_to_torch(base, image_size, BASE_PREFIX)
    state_dict.update(names_encoder.encoder_to_torch(momentum, image_size, MOMENTUM_PREFIX))
    stats = predictor.get("batch_stats", {})
    mlp = names_encoder.mlp_to_torch(predictor["params"], stats, PREDICTOR_PREFIX[:-1])
    state_dict.update(mlp)
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
    state_dict = names_encoder.encoder_to_torch(encoder)
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
    ``weights_only=True``) or of the detectron2 converter's ``.pkl`` (numpy arrays only). Every
    weights file is read here, once ``storage.check_input`` has let it through (a FIFO
    would block, ``/dev/zero`` fill memory)."""
    storage.check_input(path)
    if torch_files.is_torch_file(path):
        state_dict = torch_files.load_torch_file(path)
        prefix = encoder_prefix(state_dict)
        if prefix in (QUERY_PREFIX, BASE_PREFIX):
            return state_dict, V1_V2_CHECKPOINT if prefix == QUERY_PREFIX else V3_CHECKPOINT
        names = (name[len(prefix) :] for name in state_dict if isinstance(name, str))
        if names_vit.has_vit_names(names):
            return state_dict, "a ViT state dict (timm's names)"
        return state_dict, "a torchvision state dict"
    payload = torch_files.load_pickle_file(path)
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
    """Where the encoder's tensors are: ``module.encoder_q.`` (official MoCo v1/v2),
    ``module.base_encoder.`` (moco-v3), ``module.`` (DataParallel) or nothing."""
    names = [name for name in state_dict if isinstance(name, str)]
    for prefix in (QUERY_PREFIX, BASE_PREFIX):
        if any(name.startswith(prefix) for name in names):
            return prefix
    if names and all(name.startswith(MOCO_PREFIX) for name in names):
        return MOCO_PREFIX
    return ""


def encoder_tensors(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``{official name: tensor}`` of the encoder in ``state_dict`` (``encoder_prefix`` removed;
    keys that are no names left out), unchecked."""
    prefix = encoder_prefix(state_dict)
    return {
        name[len(prefix) :]: value
        for name, value in state_dict.items()
        if isinstance(name, str) and name.startswith(prefix)
    }


class EncoderWeights(NamedTuple):
    """The (query / base) encoder of a weights file, as ``read_encoder`` gives it."""

    variables: dict[str, dict]  # {'params', 'batch_stats'}: backbone, and head where it has one
    tensors: dict[str, Any]  # {official name: tensor}, the encoder's prefix removed
    kind: str  # what the file is, for messages: "an official MoCo checkpoint", ...


def read_encoder(path: str | os.PathLike) -> EncoderWeights:
    """The encoder in the weights file ``path``, read once (``read_state_dict``) and converted
    with every tensor checked: the query (v1/v2) or base (v3) encoder of a MoCo checkpoint,
    with its projection head where it has one, or the state dict's whole model."""
    state_dict, kind = read_state_dict(path)
    variables = names_encoder.torch_to_encoder(state_dict, encoder_prefix(state_dict))
    return EncoderWeights(variables, encoder_tensors(state_dict), kind)
