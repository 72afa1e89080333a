"""MoCo v2 on Imagenette (10 easy ImageNet classes, ~9.5k training images): a streamed-input
recipe that a single GPU finishes in hours. Our choice of sizes (not from a paper): ResNet-18 at
128 px, K=4096 (the queue must stay well under the dataset size), m=0.99, T=0.2, batch 256,
lr 0.06 per 256, cosine over 200 epochs, aug+."""

from configs import moco_v2_imagenet


def get_config():
    config = moco_v2_imagenet.get_config()
    config.dataset.name = "imagenette/320px-v2"
    config.dataset.image_size = 128
    config.epochs = 200
    config.model.backbone = "resnet18"
    config.moco.queue_size = 4096
    config.moco.momentum = 0.99
    # One GPU: the keys' BN in 8 groups of 32 (the official colab's --bn-splits 8), since
    # Shuffle-BN has no other device to shuffle with; on 8 devices 32 is each one's whole batch.
    config.model.bn_group_size = 32
    config.optim.base_lr = 0.06
    config.knn.every_epochs = 10
    return config
