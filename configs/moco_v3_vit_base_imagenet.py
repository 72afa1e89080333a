"""MoCo v3, ViT-Base (ViT-B/16) on ImageNet, 300 epochs (moco-v3 CONFIG.md's ViT-Base
pre-training: the ViT-Small recipe of ``moco_v3_vit_small_imagenet.py`` with ``-a vit_base``).

    python train.py --config configs/moco_v3_vit_base_imagenet.py --workdir WORKDIR \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Batch 4096, AdamW lr 1.5e-4 per 256, wd 0.1, 40 warm-up epochs, T 0.2, m 0.99 with the cosine,
frozen patch projection; projector 768-4096-4096-256. Expected (moco-v3 CONFIG.md): 76.7%
linear top-1 (``configs/linear_moco_v3.py`` with ``--config.optim.base_lr=3``).
"""

from configs import moco_v3_vit_small_imagenet


def get_config():
    return moco_v3_vit_small_imagenet.get_config(backbone="vit_base")
