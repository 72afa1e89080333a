"""A plain-PyTorch re-statement of facebookresearch/moco-v3's training step, for the parity test.

Restated (not copied) from moco-v3's ``moco/builder.py`` (``MoCo``, ``MoCo_ResNet``, ``MoCo_ViT``:
``_build_mlp``, ``_update_momentum_encoder``, ``contrastive_loss``, ``forward``), ``vits.py``
(timm's ``VisionTransformer`` with the fixed 2-D sin-cos position embedding and
``stop_grad_conv1``), ``moco/optimizer.py`` (``LARS``) and ``main_moco.py`` (one iteration of
``train``: lr and m set per step, then forward, ``zero_grad``, backward, ``step``). The ResNet is
torchvision's (``benchmarks/torch_reference.py``'s blocks) with the CIFAR stem.

The official runs one process per GPU under DistributedDataParallel with SyncBatchNorm. Here
one process holds the whole global batch and stands in for ``num_devices`` of them:

- a BatchNorm over the global batch is SyncBatchNorm (statistics, unbiased running variance
  and gradients over every device's rows);
- ``contrastive_loss`` cuts the queries into ``num_devices`` shards; shard ``r`` is scored
  against every key (``concat_all_gather``) with positives at ``arange(N) + N * r``, and the
  shards' losses are averaged, which is what DDP's gradient averaging optimises.

Module and parameter names follow timm / torchvision (``patch_embed.proj``, ``blocks.0.attn.qkv``,
``layer1.0.downsample.0``, the projector ``head``/``fc`` as an ``nn.Sequential``), so the test
maps moco_jax's parameter paths onto them one to one. No automatic mixed precision.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_reference import BasicBlock


def build_mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool = True):
    """``_build_mlp``: bias-free Linears with BN + ReLU between them; after the last Linear a BN
    without affine parameters when ``last_bn``."""
    layers: list[nn.Module] = []
    for layer in range(num_layers):
        last = layer == num_layers - 1
        width = out_dim if last else hidden
        layers.append(nn.Linear(in_dim if layer == 0 else hidden, width, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(width), nn.ReLU()]
        elif last_bn:
            layers.append(nn.BatchNorm1d(width, affine=False))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# Backbones. Each has an attribute (``fc`` / ``head``) that MoCo replaces with its projector.


class CifarResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks, the 3x3/1 stem without max-pool, ``stage_sizes``
    blocks per stage (torchvision's ResNet-18 is ``(2, 2, 2, 2)``)."""

    def __init__(self, stage_sizes, in_channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes = width
        for stage, num_blocks in enumerate(stage_sizes):
            blocks, out = [], width * 2**stage
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(planes, out, stride, nn.BatchNorm2d))
                planes = out
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.stages = len(stage_sizes)
        self.num_features = planes
        self.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(self.stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def sincos_table(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """``build_2d_sincos_position_embedding`` on a square grid, float32 ``[1, 1 + grid^2, dim]``:
    a zero CLS row, then per patch ``[sin, cos]`` of its first grid coordinate (the official's
    "w", from ``meshgrid(w, h)`` in "ij" order, so the row) times ``omega``, then of the other;
    ``omega = temperature ** -(arange(dim / 4) / (dim / 4))``."""
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    first, second = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32),
        torch.arange(grid, dtype=torch.float32),
        indexing="ij",
    )
    a = first.reshape(-1, 1) * omega
    b = second.reshape(-1, 1) * omega
    table = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.heads
        # [3, batch, heads, tokens, head_dim]
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, timm's nn.GELU


class Block(nn.Module):
    """Pre-norm transformer block, LayerNorm eps 1e-6 (vits.py's ``norm_layer``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, D, h, w] -> [N, h * w, D]


class VisionTransformer(nn.Module):
    """vits.py's ``VisionTransformerMoCo``: timm's ViT (CLS token, final norm, CLS output into
    ``head``), the frozen sin-cos ``pos_embed`` and, with ``stop_grad_conv1``, a frozen patch
    projection (``requires_grad=False``: no gradient, so neither optimizer touches it)."""

    def __init__(self, image_size, patch, in_channels, dim, depth, heads, stop_grad_conv1):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_table(image_size // patch, dim), requires_grad=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.num_features = dim
        self.head = nn.Identity()
        if stop_grad_conv1:
            for p in self.patch_embed.proj.parameters():
                p.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# --------------------------------------------------------------------------------------------
# MoCo v3.


class MoCoV3(nn.Module):
    """builder.py's ``MoCo``: base encoder (backbone + projector), momentum encoder (a copy of
    it, no gradient), predictor; the subclasses set the MLP layouts."""

    head_attr = ""  # the backbone attribute the projector replaces
    projector_layers = 0
    predictor_last_bn = True

    def __init__(self, backbone, dim, mlp_dim, temperature, num_devices):
        super().__init__()
        self.temperature, self.num_devices = temperature, num_devices
        projector = build_mlp(self.projector_layers, backbone.num_features, mlp_dim, dim)
        setattr(backbone, self.head_attr, projector)
        self.base_encoder = backbone
        self.momentum_encoder = copy.deepcopy(backbone)
        for p in self.momentum_encoder.parameters():
            p.requires_grad = False
        self.predictor = build_mlp(2, dim, mlp_dim, dim, self.predictor_last_bn)

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """Every momentum-encoder parameter (frozen ones too) <- ``m * itself + (1 - m) * base``."""
        pairs = zip(self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True)
        for base, momentum in pairs:
            momentum.copy_(momentum * m + base * (1.0 - m))

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean over the simulated devices of ``2 T * CE(q_r k_all^T / T, arange(N) + N r)``."""
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        per_device = q.shape[0] // self.num_devices
        losses = []
        for rank, q_local in enumerate(torch.split(q, per_device)):
            logits = q_local @ k.T / self.temperature  # k: every device's keys, in device order
            labels = torch.arange(per_device) + per_device * rank
            losses.append(F.cross_entropy(logits, labels) * (2 * self.temperature))
        return torch.stack(losses).mean()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class MoCoV3ResNet(MoCoV3):
    """``MoCo_ResNet``: 2-layer projector as ``fc``, 2-layer predictor without a last BN."""

    head_attr, projector_layers, predictor_last_bn = "fc", 2, False


class MoCoV3ViT(MoCoV3):
    """``MoCo_ViT``: 3-layer projector as ``head``, 2-layer predictor with a last BN."""

    head_attr, projector_layers, predictor_last_bn = "head", 3, True


class LARS(torch.optim.Optimizer):
    """moco/optimizer.py's LARS: on tensors with ndim > 1 the gradient gets ``wd * p`` and is
    scaled by ``trust * |p| / |g|`` (1 where a norm is 0); then ``mu = momentum * mu + g`` and
    ``p -= lr * mu``. Tensors without a gradient are skipped."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "trust_coefficient": trust_coefficient}  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g + group["weight_decay"] * p
                    p_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(g)
                    if p_norm > 0 and g_norm > 0:
                        g = g * (group["trust_coefficient"] * p_norm / g_norm)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(g)
                p.sub_(group["lr"] * state["mu"])


def warmup_cosine_lr(peak: float, epoch: float, warmup: int, epochs: int) -> float:
    """main_moco.py's ``adjust_learning_rate`` at the fractional epoch ``epoch + i / iters``."""
    if epoch < warmup:
        return peak * epoch / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def cosine_momentum(m0: float, epoch: float, epochs: int) -> float:
    """main_moco.py's ``adjust_moco_momentum`` (``--moco-m-cos``)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m0)


def train_step(model: MoCoV3, optimizer, x1, x2, lr: float, m: float) -> float:
    """One iteration of main_moco.py's ``train``: set the lr, loss, zero_grad, backward, step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model(x1, x2, m)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()
