"""ResNet-18/34/50 with torchvision's structure, so weights cross over with the weight bridge.

Module names mirror torchvision's state-dict names (``layer1_0/conv1`` <-> ``layer1.0.conv1``),
padding is explicit (torch pads 3x3 stride-2 convs symmetrically, unlike ``SAME``), the
bottleneck strides on its 3x3 conv (ResNet v1.5, as torchvision), and initialisation follows
torchvision (Kaiming-normal fan-out convs). ``cifar_stem`` swaps the 7x7/2 conv + max-pool for a
3x3/1 conv, as the official MoCo CIFAR-10 demo does. ``zero_init_residual`` (torchvision's flag,
which MoCo v3 sets) starts the last BN of every residual block at scale 0, so that each block
starts as the identity.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moco_jax.models.registry import base_width, register_backbone

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    features: int
    stride: int
    norm: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]
    last_bn_scale_init: nn.initializers.Initializer = nn.initializers.ones
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(
            self.features, (3, 3), (self.stride, self.stride), ((1, 1), (1, 1)), name="conv1"
        )(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), (1, 1), ((1, 1), (1, 1)), name="conv2")(y)
        y = self.norm(name="bn2", scale_init=self.last_bn_scale_init)(y)
        return nn.relu(y + _shortcut(self, x, y.shape[-1]))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convs (ResNet-50)."""

    features: int
    stride: int
    norm: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]
    last_bn_scale_init: nn.initializers.Initializer = nn.initializers.ones
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.features, (1, 1), (1, 1), ((0, 0), (0, 0)), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(
            self.features, (3, 3), (self.stride, self.stride), ((1, 1), (1, 1)), name="conv2"
        )(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features * 4, (1, 1), (1, 1), ((0, 0), (0, 0)), name="conv3")(y)
        y = self.norm(name="bn3", scale_init=self.last_bn_scale_init)(y)
        return nn.relu(y + _shortcut(self, x, y.shape[-1]))


def _shortcut(block: nn.Module, x: jax.Array, out_features: int) -> jax.Array:
    """Identity, or torchvision's ``downsample`` (1x1 strided conv + BN) when shapes differ."""
    if block.stride == 1 and x.shape[-1] == out_features:
        return x
    s = block.stride
    x = block.conv(out_features, (1, 1), (s, s), ((0, 0), (0, 0)), name="downsample_conv")(x)
    return block.norm(name="downsample_bn")(x)


class ResNet(nn.Module):
    """torchvision ResNet without its ``fc``: returns globally average-pooled features."""

    stage_sizes: Sequence[int]
    block_cls: Any
    width: int = 64
    cifar_stem: bool = False
    norm: Callable[..., nn.Module] = nn.BatchNorm
    dtype: jnp.dtype = jnp.float32
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(
            nn.Conv, use_bias=False, kernel_init=conv_kernel_init, dtype=self.dtype
        )
        norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
        x = x.astype(self.dtype)
        if self.cifar_stem:
            x = conv(self.width, (3, 3), (1, 1), ((1, 1), (1, 1)), name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
        else:
            x = conv(self.width, (7, 7), (2, 2), ((3, 3), (3, 3)), name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
            x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                x = self.block_cls(
                    features=self.width * 2**stage,
                    stride=stride,
                    norm=norm,
                    conv=conv,
                    last_bn_scale_init=last_scale,
                    name=f"layer{stage + 1}_{index}",
                )(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def total_stride(stage_count: int, cifar_stem: bool) -> int:
    """How many times ``ResNet`` divides the image's side by its last stage: the stem (1; or 4,
    the 7x7/2 conv and the 3x3/2 max-pool) times the stride 2 of every stage after the first."""
    return (1 if cifar_stem else 4) * 2 ** (stage_count - 1)


RESNET_SPECS = {
    "resnet18": ([2, 2, 2, 2], BasicBlock),
    "resnet34": ([3, 4, 6, 3], BasicBlock),
    "resnet50": ([3, 4, 6, 3], Bottleneck),
}


def _make_factory(name: str) -> None:
    stage_sizes, block_cls = RESNET_SPECS[name]

    @register_backbone(name)
    def factory(model_config: Any, norm: Callable[..., nn.Module], dtype: jnp.dtype) -> nn.Module:
        return ResNet(
            stage_sizes=stage_sizes,
            block_cls=block_cls,
            width=base_width(model_config),
            cifar_stem=model_config.cifar_stem,
            norm=norm,
            dtype=dtype,
            zero_init_residual=bool(model_config.zero_init_residual),
        )


for _name in RESNET_SPECS:
    _make_factory(_name)
