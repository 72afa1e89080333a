"""The one error of the PyTorch border, at the bottom of its layers (every other module raises it).

A ``ConfigError`` (``config.checks``, which loads no JAX): the command lines print it as one
``error:`` line like any other mistake in what the user gave, and raising it from the numpy-only
modules (``arrays``, ``names_resnet``, ``torch_files``) drags neither JAX nor Flax in.
"""

from __future__ import annotations

from moco_jax.config.checks import ConfigError


class WeightBridgeError(ConfigError):
    """A weights file or state dict that cannot be read, or whose names or shapes do not fit."""
