"""The demo: MoCo on Fashion-MNIST, sized to finish pretraining + kNN in about 20 minutes on 2 CPU
cores and end above the raw-pixel kNN baseline. It is the reference recipe
(fashion_mnist_reference.py) with the cosine schedule over 5 epochs instead of 10 and the kNN
monitor run once, after the last epoch. ``--config.epochs=N`` scales it up;
``--config.knn.every_epochs=1`` draws the kNN curve epoch by epoch."""

from configs import fashion_mnist_reference


def get_config():
    config = fashion_mnist_reference.get_config()
    config.epochs = 5
    config.knn.every_epochs = 5
    return config
