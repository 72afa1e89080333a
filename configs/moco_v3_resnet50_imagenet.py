"""MoCo v3, ResNet-50 on ImageNet, 100 epochs (Chen, Xie, He, ICCV 2021; moco-v3 CONFIG.md's
"ResNet-50, 100-epoch pre-training": main_moco.py's defaults with --moco-m-cos --crop-min=.2).

    python train.py --config configs/moco_v3_resnet50_imagenet.py --workdir WORKDIR \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Batch 4096, LARS (trust coefficient 0.001, momentum 0.9, no decay or trust ratio on 1-D
tensors) lr 0.6 per 256 (9.6 at 4096) with 10 warm-up epochs then a half-cycle cosine per
step, wd 1e-6, T 1.0, m 0.99 rising to 1 with a cosine, SyncBN everywhere, zero-init residual
blocks; projector 2048-4096-256 (last BN), predictor 256-4096-256 (no last BN); BYOL's views
(view 1 blur p=1.0, view 2 blur p=0.1 and solarize p=0.2), crop (0.2, 1). Expected (moco-v3
CONFIG.md): 68.9% linear top-1 after 100 epochs; for 300 epochs (72.8%) set
``--config.epochs=300 --config.optim.base_lr=0.3``.
"""

from moco_jax.config.defaults import base_config


def get_config():
    config = base_config()
    config.algorithm = "moco_v3"
    config.batch_size = 4096
    config.epochs = 100
    config.model.backbone = "resnet50"
    config.model.zero_init_residual = True  # torchvision's zero_init_residual=True
    config.model.head = "v3_resnet"
    config.model.dim = 256  # --moco-dim
    config.model.mlp_dim = 4096  # --moco-mlp-dim
    config.model.bn_mode = "sync"  # convert_sync_batchnorm on the whole model
    config.moco.momentum = 0.99  # --moco-m
    config.moco.momentum_cosine = True  # --moco-m-cos
    config.moco.temperature = 1.0  # --moco-t
    config.optim.name = "lars"
    config.optim.base_lr = 0.6  # --lr, per 256
    config.optim.weight_decay = 1e-6  # --wd
    config.optim.momentum = 0.9
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_epochs = 10
    config.optim.lr_milestones = ()
    set_v3_augmentation(config, crop_min=0.2)  # --crop-min=.2
    return config


def set_v3_augmentation(config, crop_min: float) -> None:
    """main_moco.py's two views (BYOL's recipe): crop (crop_min, 1), jitter (0.4, 0.4, 0.2, 0.1)
    p=0.8, grayscale p=0.2 (after the jitter), blur p=1.0 / 0.1, solarize p=0 / 0.2, flip."""
    aug = config.augment
    aug.crop_scale = (crop_min, 1.0)
    aug.jitter = (0.4, 0.4, 0.2, 0.1)
    aug.jitter_prob = 0.8
    aug.grayscale_prob = 0.2
    aug.grayscale_before_jitter = False
    aug.blur_prob = (1.0, 0.1)
    aug.blur_sigma = (0.1, 2.0)
    aug.solarize_prob = (0.0, 0.2)
