"""MoCo v2, ResNet-50 on ImageNet (Chen et al. 2020): v1 plus MLP head, T=0.2, cosine lr, aug+."""

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
