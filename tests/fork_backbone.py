"""A fork's backbone, in a module of its own that moco_jax never imports: ``test_fork.py`` names
it with ``config.imports`` (the way a fork names ``my_pkg.my_backbone``)."""

import flax.linen as nn
import jax.numpy as jnp

from moco_jax.models import base_width, register_backbone


class TinyNet(nn.Module):
    """Mean over the image, Dense, the run's BatchNorm (from ``norm``), ReLU: [N, F] features."""

    width: int
    norm: type
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool):
        x = nn.Dense(self.width, dtype=self.dtype)(images.mean(axis=(1, 2)))
        x = self.norm(use_running_average=not train, dtype=self.dtype)(x)
        return nn.relu(x).astype(jnp.float32)


@register_backbone("fork_tiny_net")
def tiny_net(model_config, norm, dtype):
    return TinyNet(width=base_width(model_config), norm=norm, dtype=dtype)
