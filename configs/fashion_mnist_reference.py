"""The reference recipe of docs/reference_runs.md, exactly: the official MoCo module run on
Fashion-MNIST with the single-device CIFAR demo's recipe. moco_jax must match or beat its curve
(kNN head top-1 72.1 / 76.0 / 80.1 / 82.3 % after epochs 1 / 2 / 5 / 10).

CIFAR-stem ResNet-18 at width 16 (716,400 parameters), 1 input channel, linear 128-d head,
K=4096, m=0.99, T=0.1, BN in 8 groups, SGD lr 0.03 (batch 256) momentum 0.9 wd 5e-4, cosine per
epoch over 10 epochs, crop (0.2, 1) + flip + jitter (0.4, 0.4, 0.4, 0.1) p=0.8 + grayscale 0.2,
no blur; kNN k=200, t=0.1 every epoch.
"""

from configs import moco_v2_cifar


def get_config():
    # The official CIFAR-10 demo's recipe (K, m, T, lr per 256, wd, cosine, transforms) ...
    config = moco_v2_cifar.get_config()
    # ... adapted to Fashion-MNIST as docs/reference_runs.md says.
    config.dataset.name = "fashion_mnist"
    config.dataset.image_size = 28
    config.dataset.num_channels = 1
    config.dataset.mean = (0.28604,)
    config.dataset.std = (0.35302,)
    config.batch_size = 256
    config.epochs = 10
    config.model.width_multiplier = 0.25
    config.model.bn_group_size = 32  # 8 groups of the batch of 256
    config.checkpoint.every_steps = 200
    return config
