"""Vision Transformers as MoCo v3 builds them (its ``vits.py`` on top of timm's ViT).

The backbone returns the CLS token after the final LayerNorm: timm's ``forward_features`` for
the model whose ``head`` MoCo v3 replaces with its projector. As in the official ``vits.py``:
a fixed 2-D sin-cos position embedding with a zero row for the CLS token, LayerNorm eps 1e-6,
qkv with bias, exact GELU, qkv kernels uniform with the fan of one of q/k/v, every other Linear
Xavier-uniform, the patch projection Xavier-uniform as a Linear of ``C * p * p`` inputs (the
official code writes ``3 * p * p``; the two agree on RGB), zero biases, CLS token N(0, 1e-6),
and ``stop_grad_conv1``, the frozen random patch projection (here a stop_gradient; the optimizer
must also mask the projection out of weight decay, as torch's ``requires_grad=False`` does).

Parameter names mirror timm's state dict one to one (``timm_name`` / ``flax_path``): flax
``blocks_3/attn/qkv/kernel [in, out]`` is timm ``blocks.3.attn.qkv.weight [out, in]``, the
patch projection ``patch_embed/proj/kernel [p, p, C, D]`` is ``patch_embed.proj.weight
[D, C, p, p]``, LayerNorm ``scale`` is ``weight``, ``cls_token [1, 1, D]`` is itself.

``pos_embed`` is not a parameter: it is a constant of the image size (the official freezes it
with ``requires_grad=False``), so it takes no optimizer state and no weight decay, and a
parameter count here is timm's minus ``(1 + h * w) * D``. An exporter writes
``sincos_position_embedding(h, w, D)``, ``[1, 1 + h * w, D]``, as timm's ``pos_embed``.

The backbone has no BatchNorm, so ``norm`` (and with it the BN modes) does not reach it;
``model.width_multiplier`` scales the embedding width; ``model.cifar_stem`` does not apply;
``model.stop_grad_conv1`` (absent: False) sets the frozen patch projection.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moco_jax.models.registry import register_backbone


def sincos_position_embedding(
    grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0
) -> np.ndarray:
    """MoCo v3's fixed table ``[1, 1 + grid_h * grid_w, dim]`` in float32, CLS row zero.

    Row ``1 + m`` is ``[sin(a w), cos(a w), sin(b w), cos(b w)]`` with ``w = temperature **
    -(arange(dim / 4) / (dim / 4))`` and ``(a, b) = divmod(m, grid_h)`` (the official
    ``torch.meshgrid(arange(w), arange(h))``, "ij"): on a square grid ``a`` is the token's row.
    """
    if dim % 4:
        raise ValueError(
            f"ViT: the 2-D sin-cos position embedding needs a width divisible by 4 (got {dim})"
        )
    pos_dim = dim // 4
    omega = np.float32(1) / np.float32(temperature) ** (
        np.arange(pos_dim, dtype=np.float32) / pos_dim
    )
    grid_a, grid_b = np.meshgrid(
        np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32), indexing="ij"
    )
    out_a, out_b = np.outer(grid_a.reshape(-1), omega), np.outer(grid_b.reshape(-1), omega)
    table = np.concatenate([np.sin(out_a), np.cos(out_a), np.sin(out_b), np.cos(out_b)], axis=1)
    return np.concatenate([np.zeros((1, dim), np.float32), table])[None]


def symmetric_uniform(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def qkv_kernel_init(
    key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """Xavier-uniform of one of q, k, v: the fan is ``in + out / 3`` for the fused kernel."""
    fan_in, fan_out = shape
    return symmetric_uniform(math.sqrt(6.0 / (fan_out // 3 + fan_in)))(key, shape, dtype)


def _dense(
    features: int,
    name: str,
    dtype: jnp.dtype,
    kernel_init: nn.initializers.Initializer | None = None,
) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=kernel_init or nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        name=name,
    )


def _layer_norm(name: str, dtype: jnp.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


class PatchEmbed(nn.Module):
    """``[N, H, W, C]`` -> ``[N, (H / p) * (W / p), D]`` tokens in row-major order (timm's)."""

    patch_size: int
    embed_dim: int
    stop_grad: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        bound = math.sqrt(6.0 / (x.shape[-1] * p * p + self.embed_dim))
        x = nn.Conv(
            self.embed_dim,
            (p, p),
            (p, p),
            padding="VALID",
            kernel_init=symmetric_uniform(bound),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="proj",
        )(x)
        if self.stop_grad:  # moco-v3's stop_grad_conv1: a frozen random projection
            x = jax.lax.stop_gradient(x)
        return x.reshape(x.shape[0], -1, self.embed_dim)


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused ``qkv`` layout ``[3, heads, head_dim]``."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = _dense(3 * dim, "qkv", self.dtype, qkv_kernel_init)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, dim)
        return _dense(dim, "proj", self.dtype)(out)


class Mlp(nn.Module):
    """fc1 -> GELU (exact, as torch's ``nn.GELU``) -> fc2."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.gelu(_dense(self.hidden, "fc1", self.dtype)(x), approximate=False)
        return _dense(x.shape[-1], "fc2", self.dtype)(y)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.num_heads, self.dtype, name="attn")(
            _layer_norm("norm1", self.dtype)(x)
        )
        hidden = int(x.shape[-1] * self.mlp_ratio)
        return x + Mlp(hidden, self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))


class VisionTransformer(nn.Module):
    """MoCo v3's ViT without its head: ``[N, H, W, C]`` -> the final-normed CLS token ``[N, D]``."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    stop_grad_conv1: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # no dropout, no BatchNorm
        p, dim = self.patch_size, self.embed_dim
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"ViT: image size {x.shape[1]}x{x.shape[2]} is not divisible by the patch size {p}"
            )
        if dim % self.num_heads:
            raise ValueError(f"ViT: width {dim} is not divisible by {self.num_heads} heads")
        pos_embed = sincos_position_embedding(x.shape[1] // p, x.shape[2] // p, dim)
        x = PatchEmbed(p, dim, self.stop_grad_conv1, self.dtype, name="patch_embed")(
            x.astype(self.dtype)
        )
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim), jnp.float32)
        cls_tokens = jnp.broadcast_to(cls_token.astype(self.dtype), (x.shape[0], 1, dim))
        x = jnp.concatenate([cls_tokens, x], axis=1) + jnp.asarray(pos_embed, self.dtype)
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, self.dtype, name=f"blocks_{i}")(x)
        return _layer_norm("norm", self.dtype)(x)[:, 0].astype(jnp.float32)


# name: (patch size, width at model.width_multiplier=1, depth, heads).
VIT_SPECS = {
    "vit_small": (16, 384, 12, 12),  # moco-v3's vit_small (ViT-S/16)
    "vit_base": (16, 768, 12, 12),  # moco-v3's vit_base (ViT-B/16)
    "vit_tiny": (4, 192, 12, 3),  # timm's ViT-Ti/DeiT-Ti shape, patch 4 for 28x28/32x32 images
    "vit_mini": (4, 64, 4, 2),  # CPU-sized, for 28x28/32x32 images: minutes per epoch on a CPU
    "vit_test": (4, 64, 2, 2),  # for tests: compiles in about a second
}


def vit_width(name: str, width_multiplier: float) -> int:
    """The embedding width of ``VIT_SPECS[name]`` at ``model.width_multiplier``."""
    return int(round(VIT_SPECS[name][1] * width_multiplier))


def _make_factory(name: str) -> None:
    patch_size, _, depth, num_heads = VIT_SPECS[name]

    @register_backbone(name)
    def factory(model_config: Any, norm: Callable[..., nn.Module], dtype: jnp.dtype) -> nn.Module:
        del norm  # LayerNorm only
        return VisionTransformer(
            patch_size=patch_size,
            embed_dim=vit_width(name, model_config.width_multiplier),
            depth=depth,
            num_heads=num_heads,
            stop_grad_conv1=bool(model_config.stop_grad_conv1),
            dtype=dtype,
        )


for _name in VIT_SPECS:
    _make_factory(_name)


_TIMM_LEAF = {"kernel": "weight", "scale": "weight"}


def timm_name(path: Sequence[str]) -> str:
    """``("blocks_0", "attn", "qkv", "kernel")`` -> ``"blocks.0.attn.qkv.weight"`` (a path inside
    the backbone's params; the array layouts differ as the module docstring says)."""
    parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", part) for part in path]
    return ".".join([*parts[:-1], _TIMM_LEAF.get(parts[-1], parts[-1])])


def flax_path(name: str) -> tuple[str, ...]:
    """The inverse of ``timm_name``: ``"blocks.0.norm1.weight"`` -> ``("blocks_0", "norm1",
    "scale")``."""
    parts = re.sub(r"^blocks\.(\d+)\.", r"blocks_\1.", name).split(".")
    if parts[-1] == "weight":
        parts[-1] = "scale" if parts[-2].startswith("norm") else "kernel"
    return tuple(parts)
