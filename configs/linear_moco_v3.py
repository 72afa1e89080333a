"""Linear classification with the MoCo v3 protocol (moco-v3 ``main_lincls.py``; Chen, Xie, He,
ICCV 2021):

    python -m moco_jax.evaluate linear --config configs/linear_moco_v3.py \
        --pretrained PRETRAIN_WORKDIR_OR_PTH --workdir OUT

90 epochs, batch 1024, SGD momentum 0.9, lr 0.1 per 256 images (0.4 at 1024) with a half-cycle
cosine per epoch, wd 0; the same views as v1/v2 (random-resized-crop 224 + flip; resize 256 +
centre crop 224). Expected linear top-1 (the moco-v3 README, batch 4096 pretraining): ResNet-50
68.9% / 72.8% / 74.6% after 100 / 300 / 1000 epochs; ViT-Small 73.2%, ViT-Base 76.7% (300).
The official commands set ``--lr`` per model: override ``--config.optim.base_lr`` likewise.
"""

from moco_jax.config.defaults import linear_config


def get_config():
    config = linear_config()
    config.epochs = 90
    config.batch_size = 1024
    config.optim.base_lr = 0.1  # per 256: 0.4 at batch 1024
    config.optim.schedule = "cosine"
    config.optim.lr_milestones = ()
    return config
