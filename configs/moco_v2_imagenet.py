"""MoCo v2, ResNet-50 on ImageNet (Chen et al. 2020): v1 plus MLP head, T=0.2, cosine lr, aug+.

The paper's batch of 256 (defaults.py), on its 8 GPUs or 8 chips (v5e:2x4: 32 a chip), K=65536
(256 steps of keys). Larger slices: moco_v2_imagenet_4096.py."""

from moco_jax.config.defaults import base_config


def get_config():
    config = base_config()
    config.model.head = "mlp"
    config.moco.temperature = 0.2
    config.optim.schedule = "cosine"
    config.optim.lr_milestones = ()
    # "aug+": stronger jitter with p=0.8, grayscale after jitter, Gaussian blur p=0.5.
    config.augment.jitter = (0.4, 0.4, 0.4, 0.1)
    config.augment.jitter_prob = 0.8
    config.augment.grayscale_before_jitter = False
    config.augment.blur_prob = (0.5, 0.5)
    return config
