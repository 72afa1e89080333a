"""MoCo v3, ViT-Small (ViT-S/16) on ImageNet, 300 epochs (moco-v3 CONFIG.md's ViT-Small
pre-training at its reference batch 4096).

    python train.py --config configs/moco_v3_vit_small_imagenet.py --workdir WORKDIR \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

AdamW (betas 0.9, 0.999; decoupled wd 0.1) lr 1.5e-4 per 256 (2.4e-3 at 4096) with 40 warm-up
epochs then a half-cycle cosine per step, T 0.2, m 0.99 rising to 1 with a cosine, the frozen
random patch projection (--stop-grad-conv1), SyncBN in the heads; projector 384-4096-4096-256
(last BN), predictor 256-4096-256 (last BN); BYOL's views with crop (0.08, 1). Expected
(moco-v3 CONFIG.md): 73.2% linear top-1 (``configs/linear_moco_v3.py`` with
``--config.optim.base_lr=3``).
"""

from configs.moco_v3_resnet50_imagenet import set_v3_augmentation
from moco_jax.config.defaults import base_config

BACKBONE = "vit_small"


def get_config(backbone: str = BACKBONE):
    config = base_config()
    config.algorithm = "moco_v3"
    config.batch_size = 4096
    config.epochs = 300
    config.model.backbone = backbone
    config.model.stop_grad_conv1 = True  # --stop-grad-conv1
    config.model.head = "v3_vit"
    config.model.dim = 256  # --moco-dim
    config.model.mlp_dim = 4096  # --moco-mlp-dim
    config.model.bn_mode = "sync"  # convert_sync_batchnorm: the projector and predictor BNs
    config.moco.momentum = 0.99  # --moco-m
    config.moco.momentum_cosine = True  # --moco-m-cos
    config.moco.temperature = 0.2  # --moco-t=.2
    config.optim.name = "adamw"
    config.optim.base_lr = 1.5e-4  # --lr, per 256
    config.optim.weight_decay = 0.1  # --weight-decay=.1
    config.optim.betas = (0.9, 0.999)  # torch.optim.AdamW's defaults
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_epochs = 40
    config.optim.lr_milestones = ()
    set_v3_augmentation(config, crop_min=0.08)  # main_moco.py's default --crop-min
    return config
