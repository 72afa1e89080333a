"""``resnet_parity``: the two-stage ResNet of BasicBlocks the PyTorch parity tests train.

The ResNet-18 code (CIFAR stem) with stage sizes ``(1, 1)``: a downsample shortcut included, so
every kind of layer of the ResNet-18 is there, in a network that traces and compiles in seconds.
Registered with moco_jax's backbones on import; the PyTorch side builds the same stages
(``torch_moco_v3.CifarResNet``; ``torch_resnet``: ``benchmarks.torch_reference.ResNet``).
Names and shapes of the full ResNet-18 are checked by ``test_torch_bridge``.
"""

from moco_jax.models import available_backbones, base_width, register_backbone, resnet

RESNET = "resnet_parity"
RESNET_STAGES = (1, 1)

if RESNET not in available_backbones():

    @register_backbone(RESNET)
    def _resnet_parity(model_config, norm, dtype):
        return resnet.ResNet(
            stage_sizes=RESNET_STAGES,
            block_cls=resnet.BasicBlock,
            width=base_width(model_config),
            cifar_stem=True,
            norm=norm,
            dtype=dtype,
            zero_init_residual=bool(model_config.zero_init_residual),
        )


def torch_resnet(in_channels: int, width: int, dim: int, mlp_head: bool, num_splits: int):
    """``benchmarks.torch_reference.ResNet`` (torchvision's names, ``SplitBatchNorm``, the MoCo
    v1/v2 head as ``fc``) with ``resnet_parity``'s stages and the CIFAR stem."""
    import torch

    from benchmarks import torch_reference

    torch_reference.RESNET_SPECS.setdefault(
        RESNET, (list(RESNET_STAGES), torch_reference.BasicBlock)
    )

    class ParityResNet(torch_reference.ResNet):
        def forward(self, x):  # the parent's runs through layer4
            x = self.relu(self.bn1(self.conv1(x)))
            for stage in range(len(RESNET_STAGES)):
                x = getattr(self, f"layer{stage + 1}")(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ParityResNet(RESNET, in_channels, width, dim, mlp_head, num_splits, True)
