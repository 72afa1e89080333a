"""Linear classification on ImageNet with the official MoCo v1/v2 protocol (``main_lincls.py``).

    python -m moco_jax.evaluate linear --config configs/linear_imagenet.py \
        --pretrained PRETRAIN_WORKDIR_OR_PTH --workdir OUT

ResNet-50 backbone frozen (BN in evaluation mode), projection head dropped, a new linear
classifier (N(0, 0.01), bias 0) on the 2048-d pooled features; SGD momentum 0.9, lr 30 per 256
images, wd 0, 100 epochs, lr x0.1 at epochs 60 and 80; training views random-resized-crop 224
(scale 0.08-1) + flip, evaluation resize 256 + centre crop 224. Expected (the papers' figures):
60.6% top-1 for MoCo v1 (200 epochs), 67.5% for MoCo v2 (200 epochs), 71.1% for v2 at 800.
A pretraining workdir's or PyTorch file's architecture (backbone, width, stem) replaces the
model fields here.
"""

from moco_jax.config.defaults import linear_config


def get_config():
    return linear_config()
