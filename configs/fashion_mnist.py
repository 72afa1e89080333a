"""The demo: MoCo on Fashion-MNIST, sized to finish pretraining + kNN in about 20 minutes on 2 CPU
cores. The reference recipe (fashion_mnist_reference.py) shortened to 2 epochs with the cosine
schedule over those 2 epochs; ``--config.epochs=N`` scales it up."""

from configs import fashion_mnist_reference


def get_config():
    config = fashion_mnist_reference.get_config()
    config.epochs = 2
    return config
