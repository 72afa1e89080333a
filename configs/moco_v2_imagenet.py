"""MoCo v2, ResNet-50 on ImageNet (Chen et al. 2020): v1 plus MLP head, T=0.2, cosine lr."""

from moco_jax.config_defaults import base_config


def get_config():
    config = base_config()
    config.model.head = "mlp"
    config.moco.temperature = 0.2
    config.optim.schedule = "cosine"
    config.optim.lr_milestones = ()
    return config
