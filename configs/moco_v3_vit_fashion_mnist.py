"""MoCo v3 on Fashion-MNIST with a CPU-sized ViT (``vit_mini``: patch 4, so 7x7 tokens and the
CLS token at 28x28; 64 wide, 4 blocks, 2 heads):

    python train.py --config configs/moco_v3_vit_fashion_mnist.py \
        --workdir workdirs/moco_v3_vit_fashion_mnist

moco-v3's ViT recipe (``moco_v3_vit_small_imagenet.py``: AdamW lr 1.5e-4 per 256, wd 0.1,
T 0.2, m 0.99 with the cosine, frozen random patch projection, projector with a last BN in 3
layers, predictor with a last BN, BYOL's asymmetric views with crop (0.08, 1)) at batch 256 for
10 epochs with 1 warm-up epoch, heads 64-1024-1024-128 and 128-1024-128, kNN (k=200, t=0.1)
every epoch. Cost: a v3 step of vit_mini runs ~275 images/s on a 2-core CPU (about 4 minutes an
epoch, plus ~40 s of kNN); ``--config.model.backbone=vit_tiny`` (DeiT-Ti's 192 wide, 12 blocks)
is about 20x the reference ResNet's cost per image: hours per epoch on that CPU, minutes on an
accelerator. Expected result: see docs/moco_v3.md, "MoCo v3 on Fashion-MNIST".
"""

from configs import moco_v3_resnet_fashion_mnist
from configs.moco_v3_resnet50_imagenet import set_v3_augmentation


def get_config():
    config = moco_v3_resnet_fashion_mnist.get_config()  # data, batch 256, epochs, m, kNN
    config.model.backbone = "vit_mini"
    config.model.width_multiplier = 1.0
    config.model.cifar_stem = False  # not a ResNet: no stem
    config.model.zero_init_residual = False
    config.model.stop_grad_conv1 = True
    config.model.head = "v3_vit"
    config.moco.temperature = 0.2
    config.optim.name = "adamw"
    config.optim.base_lr = 1.5e-4
    config.optim.weight_decay = 0.1
    config.optim.betas = (0.9, 0.999)
    set_v3_augmentation(config, crop_min=0.08)
    return config
