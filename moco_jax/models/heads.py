"""Projection heads of MoCo v1 (linear), v2 (MLP) and v3 (BN MLPs), named as in the official code.

The official code replaces torchvision's ``fc`` with the head, so the v1 head is ``fc`` and the v2
head is ``fc.0`` (Linear, hidden width = backbone feature width) / ``fc.2`` (Linear to ``dim``);
the Flax names ``fc``, ``fc0``, ``fc2`` map onto those. MoCo v3's projector (``fc`` of a ResNet,
``head`` of a ViT) and predictor are ``nn.Sequential``s of moco-v3's ``_build_mlp``: module ``i``
of the Sequential is Flax ``fc{i}`` (Linear ``fc0``, BN ``fc1``, ReLU, Linear ``fc3``, ...).
Heads are called as ``head(features, train=...)``; only the v3 MLPs have BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moco_jax.models.batch_norm import BatchNorm


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default ``nn.Linear`` bias init."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# PyTorch's default nn.Linear weight init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), ..).
torch_linear_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_dense(features: int, fan_in: int, name: str, dtype: jnp.dtype) -> nn.Dense:
    """A Dense layer initialised as PyTorch's ``nn.Linear``."""
    return nn.Dense(
        features,
        kernel_init=torch_linear_kernel_init,
        bias_init=torch_linear_bias_init(fan_in),
        dtype=dtype,
        name=name,
    )


class LinearHead(nn.Module):
    """MoCo v1: one linear layer to ``dim``."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm
        return torch_dense(self.dim, features.shape[-1], "fc", self.dtype)(features)


class MLPHead(nn.Module):
    """MoCo v2: Linear(F, F) -> ReLU -> Linear(F, dim), F the backbone feature width."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm
        width = features.shape[-1]
        hidden = nn.relu(torch_dense(width, width, "fc0", self.dtype)(features))
        return torch_dense(self.dim, width, "fc2", self.dtype)(hidden)


class AffineFreeBatchNorm(BatchNorm):
    """torch's ``BatchNorm1d(affine=False)``: the BatchNorm with scale 1 and offset 0 as constants,
    not parameters (``param`` hands back the initialisers' ones and zeros)."""

    def param(self, name, init_fn, *args, **kwargs):
        if name == "scale":
            return nn.initializers.ones(None, *args)
        if name == "bias":
            return nn.initializers.zeros(None, *args)
        return super().param(name, init_fn, *args, **kwargs)


def _without_affine(bn: BatchNorm, name: str) -> AffineFreeBatchNorm:
    """``bn`` (an unbound BatchNorm with the run's BN settings) without scale and offset."""
    fields = {f: getattr(bn, f) for f in BatchNorm.__dataclass_fields__ if f != "parent"}
    return AffineFreeBatchNorm(**{**fields, "name": name})


class BatchNormMLP(nn.Module):
    """moco-v3's ``_build_mlp``: ``num_layers`` Linear layers without bias, Linear-BN-ReLU between
    them, and after the last one a BN without scale and offset when ``last_bn``.

    ``norm`` is the encoder's BatchNorm (``moco_jax.models.batch_norm.BatchNorm`` with the run's
    BN mode), so the heads' statistics are synchronised like the backbone's. Kernels are
    initialised as torch's ``nn.Linear``.
    """

    num_layers: int
    hidden_dim: int
    dim: int
    last_bn: bool
    norm: Callable[..., nn.Module]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for layer in range(self.num_layers):
            last = layer == self.num_layers - 1
            width = self.dim if last else self.hidden_dim
            x = nn.Dense(
                width,
                use_bias=False,
                kernel_init=torch_linear_kernel_init,
                dtype=self.dtype,
                name=f"fc{3 * layer}",
            )(x)
            if not last:
                bn = self.norm(
                    use_running_average=not train, dtype=self.dtype, name=f"fc{3 * layer + 1}"
                )
                x = nn.relu(bn(x))
            elif self.last_bn:
                bn = self.norm(use_running_average=not train, dtype=self.dtype, parent=None)
                x = _without_affine(bn, f"fc{3 * layer + 1}")(x)
        return x


# MoCo v3's layouts (moco-v3 builder.py, MoCo_ResNet / MoCo_ViT): (projector layers, projector
# last BN, predictor layers, predictor last BN).
V3_HEADS = {"v3_resnet": (2, True, 2, False), "v3_vit": (3, True, 2, True)}


def v3_projector(head: str, hidden_dim, dim, norm, dtype) -> BatchNormMLP:
    layers, last_bn, _, _ = V3_HEADS[head]
    return BatchNormMLP(layers, hidden_dim, dim, last_bn, norm, dtype)


def v3_predictor(head: str, hidden_dim, dim, norm, dtype) -> BatchNormMLP:
    _, _, layers, last_bn = V3_HEADS[head]
    return BatchNormMLP(layers, hidden_dim, dim, last_bn, norm, dtype)


HEADS = {"linear": LinearHead, "mlp": MLPHead}
HEAD_NAMES = (*HEADS, *V3_HEADS)  # every value of config.model.head
