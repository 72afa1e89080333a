"""MoCo v3 on Fashion-MNIST with the reference ResNet (``fashion_mnist_reference.py``'s
CIFAR-stem ResNet-18 at width 16, 128-d features), sized for a CPU:

    python train.py --config configs/moco_v3_resnet_fashion_mnist.py \
        --workdir workdirs/moco_v3_resnet_fashion_mnist

moco-v3's ResNet recipe (``moco_v3_resnet50_imagenet.py``: LARS lr 0.6 per 256, wd 1e-6,
T 1.0, m 0.99 with the cosine, zero-init residual blocks, projector without bias and with BN,
predictor without a last BN, BYOL's asymmetric views with crop (0.2, 1)) at batch 256 for 10
epochs with 1 warm-up epoch, heads 128-1024-128 and 128-1024-128 (the official's 4096 hidden
and 256 out are sized for ResNet-50's 2048 features), kNN (k=200, t=0.1) every epoch as the
reference recipe. Each step runs the encoder four times (two views, online and momentum), about
twice v2's work per image. Expected result (docs/moco_v3.md, "MoCo v3 on Fashion-MNIST", one
seed, 2-core CPU, ~9 minutes an epoch): kNN top-1 head / backbone 72.34 / 74.89 after epoch 1,
80.32 / 81.47 after epoch 10 (random init 59.29 / 60.51; v2's reference recipe 83.13 / 82.26);
final loss 19.04.
"""

from configs import fashion_mnist_reference
from configs.moco_v3_resnet50_imagenet import set_v3_augmentation


def get_config():
    config = fashion_mnist_reference.get_config()  # data, ResNet-18 width 16, batch 256, kNN
    config.algorithm = "moco_v3"
    config.epochs = 10
    config.model.bn_group_size = 0
    config.model.bn_mode = "sync"
    config.model.zero_init_residual = True
    config.model.head = "v3_resnet"
    config.model.dim = 128
    config.model.mlp_dim = 1024
    config.moco.momentum = 0.99
    config.moco.momentum_cosine = True
    config.moco.temperature = 1.0
    config.optim.name = "lars"
    config.optim.base_lr = 0.6
    config.optim.weight_decay = 1e-6
    config.optim.momentum = 0.9
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_epochs = 1
    config.optim.lr_milestones = ()
    set_v3_augmentation(config, crop_min=0.2)
    return config
