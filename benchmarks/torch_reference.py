"""A PyTorch re-statement of the official MoCo training step (optional: needs torch).

Used by the parity tests and by ``python -m benchmarks --torch``; it lives beside the library,
which never imports torch. Written from the description of facebookresearch/moco
(``moco/builder.py``, ``main_moco.py``) and of its single-GPU CIFAR demo's ``SplitBatchNorm``; not
copied from it.
Differences on purpose:

- the key shuffle takes its permutation as an argument (so it can be the one moco_jax drew); on
  one device this is the single-GPU demo's shuffle, ``im_k[idx_shuffle]``;
- the queue wraps around its end instead of asserting ``K % batch == 0``.

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layerS.B.conv1``,
``layerS.B.downsample.0/1``, ``fc`` or ``fc.0``/``fc.2``) so that state dicts produced by
``moco_jax.interop.names_resnet.flax_to_torch`` load with ``strict=True``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco_jax.config.batch_rules import key_bn_group_size
from moco_jax.models import base_width


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics come from ``num_splits`` interleaved groups.

    Viewing ``[N, C, H, W]`` as ``[N / s, C * s, H, W]`` puts sample ``n`` in group ``n % s``;
    each group is normalised with its own batch statistics and the running statistics become the
    mean over groups of the per-group running updates.
    """

    def __init__(self, num_features: int, num_splits: int):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        # view() needs NCHW-contiguous memory (a channels-last or 1-channel conv output is not).
        x = x.contiguous()
        mean_per_split = self.running_mean.repeat(s)
        var_per_split = self.running_var.repeat(s)
        y = F.batch_norm(
            x.view(n // s, c * s, h, w),
            mean_per_split,
            var_per_split,
            self.weight.repeat(s),
            self.bias.repeat(s),
            training=True,
            momentum=self.momentum,
            eps=self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(mean_per_split.view(s, c).mean(dim=0))
            self.running_var.copy_(var_per_split.view(s, c).mean(dim=0))
        return y.view(n, c, h, w)


def make_norm(num_splits: int):
    """``nn.BatchNorm2d`` for one group (channels-last friendly), ``SplitBatchNorm`` otherwise."""
    if num_splits == 1:
        return nn.BatchNorm2d
    return lambda channels: SplitBatchNorm(channels, num_splits)


class DownsampleConv(nn.Conv2d):
    """The shortcut's strided 1x1 convolution (``downsample.0``), an ``nn.Conv2d`` with its
    parameters; on CPU, with fewer than 16 input channels, it subsamples first and convolves with
    stride 1, the same function.

    Why: oneDNN v3.12.0 (bundled in torch 2.14.x) writes past its scratchpad in the weight
    gradient of a strided 1x1 convolution on a channels-last input with fewer input channels than
    its channel block (8 for AVX2, 16 for AVX-512), the "reduce to unit stride" path. On an AVX2
    CPU a bare channels-last ``nn.Conv2d(4, 8, 1, stride=2)`` backward kills the process with 1
    thread ("free(): invalid next size", SIGSEGV) and now and then hangs with 2; upstream
    uxlfoundation/oneDNN#6035 (open) also reports wrong gradients. The thin smoke and test
    ResNets (4 to 8 channels) have such shortcuts. Stride-1 1x1 convolutions take another path,
    and turning oneDNN off instead costs the parity tests their 1e-4 agreement (PyTorch's native
    CPU convolutions are less accurate in float32); full-width ResNets and CUDA are unaffected.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        plain = self.kernel_size != (1, 1) or self.padding != (0, 0) or (sh, sw) == (1, 1)
        if plain or x.device.type != "cpu" or self.in_channels >= 16:
            return super().forward(x)
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias, groups=self.groups)


class BasicBlock(nn.Module):
    """torchvision's ResNet-18/34 block."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                DownsampleConv(in_planes, planes, 1, stride, bias=False), norm(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, norm):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, 1, bias=False)
        self.bn3 = norm(out_planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                DownsampleConv(in_planes, out_planes, 1, stride, bias=False), norm(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


RESNET_SPECS = {
    "resnet18": ([2, 2, 2, 2], BasicBlock),
    "resnet34": ([3, 4, 6, 3], BasicBlock),
    "resnet50": ([3, 4, 6, 3], Bottleneck),
}


class ResNet(nn.Module):
    """torchvision's ResNet with ``fc`` replaced by the MoCo head (v1 linear, v2 MLP)."""

    def __init__(
        self,
        arch: str,
        in_channels: int,
        width: int,
        dim: int,
        mlp_head: bool,
        num_splits: int,
        cifar_stem: bool,
    ):
        super().__init__()
        stage_sizes, block = RESNET_SPECS[arch]
        norm = make_norm(num_splits)
        if cifar_stem:  # the CIFAR demo: 3x3/1 conv, no max-pool
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = None
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = norm(width)
        self.relu = nn.ReLU()
        in_planes = width
        for stage, num_blocks in enumerate(stage_sizes):
            planes = width * 2**stage
            blocks = []
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(in_planes, planes, stride, norm))
                in_planes = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if mlp_head:  # MoCo v2
            self.fc = nn.Sequential(
                nn.Linear(in_planes, in_planes), nn.ReLU(), nn.Linear(in_planes, dim)
            )
        else:  # MoCo v1
            self.fc = nn.Linear(in_planes, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet18(ResNet):
    """ResNet-18 with the CIFAR stem (3x3/1 conv, no max-pool) and ``fc`` as the MoCo head."""

    def __init__(self, in_channels: int, width: int, dim: int, mlp_head: bool, num_splits: int):
        super().__init__("resnet18", in_channels, width, dim, mlp_head, num_splits, True)


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and the queue of negatives, as ``moco.builder.MoCo``."""

    def __init__(self, make_encoder, dim: int, queue_size: int, m: float, temperature: float):
        super().__init__()
        self.m = m
        self.temperature = temperature
        self.encoder_q = make_encoder()
        self.encoder_k = make_encoder()
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        # Parameters only; the key encoder's BN buffers come from its own forward passes.
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            p_k.mul_(self.m).add_(p_q.detach(), alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        size = self.queue.shape[1]
        ptr = int(self.queue_ptr)  # a device-to-host sync each step, as in the original
        columns = (ptr + torch.arange(keys.shape[0], device=self.queue.device)) % size  # wraps
        self.queue[:, columns] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + keys.shape[0]) % size

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, idx_shuffle: torch.Tensor):
        """Logits ``[N, 1 + K]`` (positive first) and zero labels; enqueues this batch's keys."""
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = self.encoder_k(im_k[idx_shuffle])
            k = F.normalize(k, dim=1)
            k = k[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def build_moco(config: Any, num_splits: int) -> MoCo:
    """The MoCo module of a moco_jax config (ResNet backbones only)."""
    m = config.model
    if m.backbone not in RESNET_SPECS:
        raise ValueError(f"no PyTorch re-statement of backbone {m.backbone!r}")
    width = base_width(m)

    def make_encoder():
        return ResNet(
            m.backbone,
            config.dataset.num_channels,
            width,
            m.dim,
            m.head == "mlp",
            num_splits,
            m.cifar_stem,
        )

    return MoCo(
        make_encoder, m.dim, config.moco.queue_size, config.moco.momentum, config.moco.temperature
    )


def build_for_training(
    config: Any, batch: int, lr: float, device: str | torch.device = "cpu"
) -> tuple[MoCo, torch.optim.Optimizer, nn.Module, int]:
    """The official training set-up for one device's ``batch``: the MoCo module in train mode and
    channels-last, SGD (momentum, coupled weight decay) at ``lr`` and the cross-entropy loss.
    Also returns the number of BN groups (``batch / bn_group_size``, the size moco_jax builds
    its encoder with on one device: ``model.bn_group_size``, else 8 groups with Shuffle-BN)."""
    group = key_bn_group_size(config.model, batch, 1)
    num_splits = batch // group if group else 1
    model = build_moco(config, num_splits).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
    )
    return model, optimizer, nn.CrossEntropyLoss().to(device), num_splits


def cosine_learning_rate(lr: float, epoch: int, epochs: int) -> float:
    """``main_moco.adjust_learning_rate`` with ``--cos``: set at the start of each epoch."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def train_step(
    model: MoCo,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    im_q: torch.Tensor,
    im_k: torch.Tensor,
    idx_shuffle: torch.Tensor,
    lr: float,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One iteration of ``main_moco.train``: forward, cross-entropy, backward, SGD step.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs forward and loss under ``torch.autocast``
    (mixed precision, fp32 parameters); None keeps everything in float32.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(
        im_q.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    ):
        logits, labels = model(im_q, im_k, idx_shuffle)
        loss = criterion(logits.float(), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())  # loss.item() every step, as main_moco.py's meters do
