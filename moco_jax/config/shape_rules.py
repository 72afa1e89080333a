"""Rules that tie the image size and the width to the backbone's shape, checked by validation.

Without them a ViT whose patch does not divide the image, or whose width its heads (or the 2-D
sin-cos position embedding, which needs a multiple of 4) cannot split, fails with a traceback from
inside the model's initialisation; and a ResNet trains on images of any size, even 1x1, because
its convolutions pad: the last stage is never empty, only made of padding. Each rule here is one
``ConfigError`` naming the fields, before anything is built.

- ResNet: the image must fill at least one cell of the last stage, i.e. be at least the total
  stride (``resnet.total_stride``: 8 with the CIFAR stem, 32 with the ImageNet stem for the
  four-stage ResNets).
- ViT: at least one patch, a whole number of patches, and a width (``vit.vit_width``) that the
  heads and 4 divide.
- Other backbones (``mlp``, ``pixels``, a fork's) take images of any size.
"""

from __future__ import annotations

from typing import Any

from moco_jax.config.checks import require
from moco_jax.models.resnet import RESNET_SPECS, total_stride
from moco_jax.models.vit import VIT_SPECS, vit_width


def check_model_shapes(config: Any) -> None:
    """``ConfigError`` for an image size or width that ``config.model.backbone`` cannot use."""
    backbone = config.model.backbone
    if backbone in RESNET_SPECS:
        _check_resnet(config)
    elif backbone in VIT_SPECS:
        _check_vit(config)


def smallest_image_size(model: Any) -> int:
    """The smallest ``dataset.image_size`` the backbone of ``model`` (``config.model``) accepts."""
    if model.backbone in RESNET_SPECS:
        return total_stride(len(RESNET_SPECS[model.backbone][0]), model.cifar_stem)
    if model.backbone in VIT_SPECS:
        return VIT_SPECS[model.backbone][0]
    return 1


def _check_resnet(config: Any) -> None:
    model, size = config.model, config.dataset.image_size
    smallest = smallest_image_size(model)
    if model.cifar_stem:
        require(
            size >= smallest,
            f"dataset.image_size {size} is too small for {model.backbone} with the CIFAR stem: "
            f"it downsamples {smallest}x, so the smallest size it accepts is {smallest}",
        )
        return
    cifar = total_stride(len(RESNET_SPECS[model.backbone][0]), True)
    require(
        size >= smallest,
        f"dataset.image_size {size} is too small for the ImageNet stem of {model.backbone}: it "
        f"downsamples {smallest}x, so the smallest size it accepts is {smallest}; set "
        f"model.cifar_stem=True for small images (from {cifar})",
    )


def _check_vit(config: Any) -> None:
    model, size = config.model, config.dataset.image_size
    patch, _, _, heads = VIT_SPECS[model.backbone]
    require(
        size >= patch,
        f"dataset.image_size {size} is smaller than one {patch}x{patch} patch of model.backbone "
        f"{model.backbone}: the smallest size it accepts is {patch}",
    )
    below = size // patch * patch
    require(
        size % patch == 0,
        f"dataset.image_size {size} is not divisible by the patch size {patch} of model.backbone "
        f"{model.backbone}: use a multiple of {patch} (e.g. {below} or {below + patch})",
    )
    width = vit_width(model.backbone, model.width_multiplier)
    where = f"model.backbone {model.backbone} at model.width_multiplier {model.width_multiplier}"
    require(
        width % heads == 0,
        f"{where} is {width} wide, which its {heads} heads do not split: the width must be a "
        f"multiple of {heads}",
    )
    require(
        width % 4 == 0,
        f"{where} is {width} wide: the 2-D sin-cos position embedding needs a width divisible by 4",
    )
