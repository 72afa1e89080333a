"""A tiny config that compiles and runs in seconds on CPU: for smoke tests and first contact."""

from moco_jax.config.defaults import base_config


def get_config():
    config = base_config()
    config.dataset.name = "fashion_mnist"
    config.dataset.image_size = 16
    config.dataset.num_channels = 1
    config.dataset.mean = (0.28604,)
    config.dataset.std = (0.35302,)
    config.dataset.max_train_examples = 512
    config.dataset.max_test_examples = 256
    config.batch_size = 64
    config.epochs = 1
    config.model.backbone = "resnet18"
    config.model.width_multiplier = 0.0625
    config.model.cifar_stem = True
    config.model.bn_group_size = 0
    config.moco.queue_size = 96
    config.moco.momentum = 0.99
    config.moco.temperature = 0.1
    config.optim.schedule = "cosine"
    config.optim.lr_milestones = ()
    config.knn.every_epochs = 1
    config.knn.k = 20
    config.log_every_steps = 2
    config.show.at_end = False  # seconds of t-SNE per run: the tests that want it turn it on
    return config
