"""MoCo v1, ResNet-50 on ImageNet (He et al. 2020, sec. 4): K=65536, m=0.999, T=0.07, lr 0.03
per 256, wd 1e-4, 200 epochs, lr x0.1 at epochs 120 and 160, linear 128-d head, Shuffle-BN."""

from moco_jax.config.defaults import base_config


def get_config():
    return base_config()
