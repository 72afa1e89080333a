"""``config.init_from``: start a run from another run's encoder weights, or from PyTorch's.

From a moco_jax workdir only the encoder's ``params`` and ``batch_stats`` are read (orbax partial
restore). From a file (an official MoCo v1/v2 or moco-v3 ``.pth.tar``, a torchvision ResNet or
timm ViT state dict, moco-v3's DeiT-format export, the detectron2 converter's ``.pkl``) the
(query / base) encoder's tensors are read without running the file's code (``formats``);
a moco-v3 file's momentum encoder and predictor are not used. Either way the backbone must have
the same shapes (else ``ConfigError`` naming what differs), the head is taken too when the run
has one of the same shapes and stays freshly initialised otherwise. Step, optimizer state, queue
and RNG stay fresh. How fine-tuning and linear evaluation start from pretraining, and how a run
with another K or dim reuses one.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from moco_jax.config.checks import ConfigError
from moco_jax.config.compatibility import ENCODER_FIELDS, config_dict, refuse_other_config
from moco_jax.interop import formats, names_encoder, names_vit
from moco_jax.interop.errors import WeightBridgeError
from moco_jax.run import fingerprint
from moco_jax.run.checkpoint_format import (
    CheckpointError,
    open_manager,
    read_description,
    read_verified,
)
from moco_jax.run.saved_run import newest_intact

ENCODER_COLLECTIONS = ("params", "batch_stats")


def find_checkpoint(
    path: str | epath.Path, what: str = "init_from"
) -> tuple[epath.Path, list[int] | None]:
    """``(checkpoints directory, [step])`` of one step's directory, or ``(checkpoints directory,
    None)`` of a workdir or checkpoints directory (read: its newest intact step)."""
    path = epath.Path(path)
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    if path.name.isdigit() and not (path / "checkpoints").is_dir():
        return path.parent, [int(path.name)]
    return (path / "checkpoints" if (path / "checkpoints").is_dir() else path), None


def load_encoder_weights(path: str, template: Any, setup: Any, what: str = "init_from") -> Any:
    """``template`` (a fresh state of ``setup``) with the encoder saved at ``path``.

    ``path``: a moco_jax workdir or checkpoints directory (its newest intact checkpoint: damaged
    ones are skipped with a warning and left as they are) or step directory; or a file: an
    official MoCo v1/v2 ``.pth.tar`` (its query encoder) or moco-v3 ``.pth.tar`` (its base
    encoder), a torchvision ResNet or timm ViT state dict (bare, under ``state_dict`` or DeiT's
    ``model``, or with DataParallel's ``module.``) or the detectron2 converter's ``.pkl``.
    The backbone must match this config's (else a ``ConfigError`` of one line naming the first
    tensor that differs); the projection head is taken when the template has one of the same
    shapes, and stays fresh otherwise. ``what`` names the setting in messages
    (``init_from``, ``linear.pretrained``). Nothing at ``path`` is changed.
    """
    if epath.Path(path).is_file():
        return _load_file(str(path), template, setup, what)
    root, steps = find_checkpoint(path, what)
    manager = open_manager(root)
    try:
        read = functools.partial(_read_encoder, manager, root, config_dict(setup.config), what)
        found = newest_intact(manager, read, steps)
    except CheckpointError as err:
        raise CheckpointError(f"{what} {path}: {err}") from None
    finally:
        manager.close()
    if found is None:
        missing = f"no checkpoint step {steps[0]}" if steps else "no checkpoint"
        raise ConfigError(f"{what}: {missing} in {root}")
    step, saved = found
    where = root / str(step)
    current = setup.algorithm.encoder_variables(template)
    loaded = {name: dict(current.get(name, {})) for name in ENCODER_COLLECTIONS}
    taken = []
    for part in _parts(current):
        new = {k: {part: current.get(k, {}).get(part)} for k in ENCODER_COLLECTIONS}
        old = {k: {part: saved.get(k, {}).get(part)} for k in ENCODER_COLLECTIONS}
        problems = fingerprint.shape_problems(fingerprint.shapes(old), fingerprint.shapes(new))
        if problems and part == "backbone":
            raise ConfigError(
                f"{what} {where}: the backbone's arrays differ from this config's: "
                + "; ".join(problems[:4])
            )
        if problems:
            logging.warning("%s: head differs (%s); it starts fresh", what, problems[0])
            continue
        _take(part, old, current, loaded)
        taken.append(part)
    logging.info("%s %s: loaded the %s", what, where, " and ".join(taken))
    return setup.algorithm.load_encoder(template, loaded)


def _read_encoder(manager: Any, root: epath.Path, current: dict, what: str, step: int) -> dict:
    """The encoder's collections saved at ``step`` (numpy), read and checked against their
    checksums alone (``Damaged`` otherwise); ``ConfigError`` for another encoder's config."""
    present, meta, saved = read_description(manager, step)
    if meta is not None:
        saved_config = meta.get("config", {})
        refuse_other_config(saved_config, current, ENCODER_FIELDS, root / str(step), f"{what} ")
    wanted = {name: saved[name] for name in ENCODER_COLLECTIONS if name in saved}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), wanted)
    return read_verified(manager, step, abstract, present, meta)[0]


def _parts(encoder: dict) -> list[str]:
    """The backbone, and the projection head where the encoder has one (a linear
    evaluation's encoder is a backbone alone)."""
    return ["backbone"] + (["head"] if "head" in encoder.get("params", {}) else [])


def _take(part: str, saved: dict, current: dict, loaded: dict) -> None:
    """``loaded[collection][part]`` = ``saved``'s, placed like ``current``'s."""
    for name in ENCODER_COLLECTIONS:
        like = current.get(name, {}).get(part)
        if like:  # None or {} (no BatchNorm, as a ViT backbone): nothing to take
            loaded[name][part] = jax.tree.map(_placed_like, saved[name][part], like)


def _load_file(path: str, template: Any, setup: Any, what: str) -> Any:
    """``load_encoder_weights`` of a PyTorch or detectron2 file (read without running code)."""
    where = f"{what} {path}"
    _refuse_unnamed_backbone(setup.config.model.backbone, where)
    try:
        variables, named, kind = formats.read_encoder(path)
    except WeightBridgeError as err:  # say which setting and file
        said = str(err) if path in str(err) else f"{path}: {err}"
        raise type(err)(f"{what} {said}") from err
    current = setup.algorithm.encoder_variables(template)
    vit = _check_backbone(named, current, where, setup.config)
    loaded = {name: dict(current.get(name, {})) for name in ENCODER_COLLECTIONS}
    _take("backbone", variables, current, loaded)
    taken = ["backbone"]
    file_head = variables["params"].get("head")
    head_names = [n for n in named if names_encoder.is_head_name(n, vit)]
    fc = ", ".join(f"{n} {list(np.shape(named[n]))}" for n in head_names)
    if "head" not in current.get("params", {}):
        if file_head is not None:
            logging.info("%s: not using the file's %s (this run has no projection head)", what, fc)
    elif file_head is None:
        logging.info("%s: the file has no fc; the projection head starts fresh", where)
    else:
        head = {k: {"head": variables[k].get("head")} for k in ENCODER_COLLECTIONS}
        like = {k: {"head": current.get(k, {}).get("head")} for k in ENCODER_COLLECTIONS}
        if fingerprint.shape_problems(fingerprint.shapes(head), fingerprint.shapes(like)):
            official = (formats.V1_V2_CHECKPOINT, formats.V3_CHECKPOINT)
            log = logging.warning if kind in official else logging.info
            log("%s: the file's %s is not this config's projection head; it starts fresh", what, fc)
        else:
            _take("head", head, current, loaded)
            taken.append("head")
    logging.info("%s: loaded the %s of %s %s", what, " and ".join(taken), kind, path)
    return setup.algorithm.load_encoder(template, loaded)


def _refuse_unnamed_backbone(backbone: str, where: str) -> None:
    """``ConfigError`` for a backbone without PyTorch names (a fork's, before its file is read):
    a file's tensors are matched by torchvision's ResNet names or timm's ViT names."""
    from moco_jax.models.resnet import RESNET_SPECS
    from moco_jax.models.vit import VIT_SPECS

    if backbone not in RESNET_SPECS and backbone not in VIT_SPECS:
        raise ConfigError(
            f"{where}: this config's backbone {backbone!r} has no PyTorch names: a weights file "
            f"loads into {', '.join([*RESNET_SPECS, *VIT_SPECS])} (torchvision's ResNet names, "
            "timm's ViT names); a moco_jax workdir's checkpoint loads into any backbone"
        )


def _check_backbone(named: dict, current: dict, where: str, config: Any) -> bool:
    """``WeightBridgeError`` naming the first backbone tensor (official name) that the file
    lacks, has with another shape, or has beyond this config's backbone, or saying that the
    file holds the other architecture (ViT / ResNet); whether the backbone is a ViT."""
    model = config.model
    vit = names_vit.is_vit(current["params"]["backbone"])
    file_vit = names_vit.has_vit_names(named)
    if vit != file_vit:
        kinds = ("a ResNet (torchvision's names)", "a ViT (timm's names)")
        raise WeightBridgeError(
            f"{where} holds {kinds[file_vit]}, but this config's backbone {model.backbone} is "
            f"{kinds[vit].split(' (')[0]}"
        )
    backbone = {k: {"backbone": v["backbone"]} for k, v in current.items() if "backbone" in v}
    zeros = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), np.float32), x.shape), backbone)
    image_size = config.dataset.image_size
    state_dict = names_encoder.encoder_to_torch(zeros, image_size, head=False)
    skip = lambda name: name.endswith("num_batches_tracked")
    expected = {name: value.shape for name, value in state_dict.items() if not skip(name)}
    got = {
        name: tuple(np.shape(value))
        for name, value in named.items()
        if not names_encoder.is_head_name(name, vit) and not skip(name)
    }
    problems = []
    for name, shape in expected.items():
        if name not in got:
            problems.append(f"{name} {list(shape)} is missing from the file")
        elif got[name] != shape:
            problems.append(f"{name} is {list(got[name])} in the file, {list(shape)} here")
    problems += [f"the file's {n} {list(s)} is not a tensor of it" for n, s in got.items()
                 if n not in expected]  # fmt: skip
    if problems:
        if vit:
            params = current["params"]["backbone"]
            dim, patch = params["cls_token"].shape[-1], names_vit.patch_size(params)
            what = f"width {dim}, patch {patch}, image size {image_size}"
        else:
            stem = "CIFAR 3x3" if model.cifar_stem else "7x7"
            what = f"width_multiplier {model.width_multiplier}, {stem} stem"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise WeightBridgeError(
            f"{where} does not fit this config's backbone ({model.backbone}, {what}): "
            f"{problems[0]}{more}"
        )
    return vit


def _placed_like(saved: np.ndarray, like: jax.Array) -> jax.Array:
    """``saved`` laid out like ``like``; works when other processes own some of the devices."""
    host = np.asarray(saved, like.dtype)
    return jax.make_array_from_callback(host.shape, like.sharding, lambda index: host[index])
