"""A tiny config that compiles and runs in seconds on CPU: for smoke tests and first contact.

What to expect: one epoch of 8 steps on 512 Fashion-MNIST images at 16 px, a ResNet-18 of width
4. The loss stays near where InfoNCE starts, ln(1 + K) = 4.6 for the K=96 queue (epoch mean
about 4.0); the kNN top-1 (about 40%) comes out BELOW the random-init encoder's (about 53%) and
far below raw pixels (about 71%). That is expected, not a failure: 8 steps move the features
away from the random init's without learning much yet (train.py prints a note saying so). It
shows that the whole pipeline runs (data, steps, kNN, checkpoints, records);
configs/fashion_mnist.py is the demo that learns (kNN 81.6% in 5 epochs).
"""

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
