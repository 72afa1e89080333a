"""The official single-device CIFAR-10 demo recipe (facebookresearch/moco colab notebook):
CIFAR-stem ResNet-18, K=4096, m=0.99, T=0.1, lr 0.06 per batch 512 (0.03 per 256), wd 5e-4,
cosine, BN split into 8 groups (group size 64 at batch 512), 200 epochs, asymmetric loss.

``--config.moco.symmetric=True`` is the demo's ``--symmetric`` option (``ctr(q1, k2) + ctr(q2,
k1)``, both views' keys enqueued: needs K >= 2 x batch, as here). The demo's kNN monitor
figures (its README, ResNet-18, 200 / 400 / 800 epochs): asymmetric 82.6 / 86.3 / 88.7,
symmetric 85.3 / 88.5 / 89.7 ("behaves like 2x epochs of the asymmetric counterpart")."""

from moco_jax.config.defaults import base_config


def get_config():
    config = base_config()
    config.dataset.name = "cifar10"
    config.dataset.image_size = 32
    config.batch_size = 512
    config.num_devices = 1
    config.model.backbone = "resnet18"
    config.model.cifar_stem = True
    config.model.bn_group_size = 64
    config.moco.queue_size = 4096
    config.moco.momentum = 0.99
    config.moco.temperature = 0.1
    config.optim.base_lr = 0.03
    config.optim.weight_decay = 5e-4
    config.optim.schedule = "cosine"
    config.optim.lr_milestones = ()
    # The demo's transform: crop (0.2, 1), flip, jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale.
    config.augment.jitter = (0.4, 0.4, 0.4, 0.1)
    config.augment.jitter_prob = 0.8
    config.augment.grayscale_before_jitter = False
    config.dataset.mean = (0.4914, 0.4822, 0.4465)
    config.dataset.std = (0.2023, 0.1994, 0.2010)
    config.knn.every_epochs = 1
    return config
