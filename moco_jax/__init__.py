"""moco_jax: MoCo v1/v2 (Momentum Contrast) in JAX/Flax for TPU, GPU and CPU."""

from moco_jax.algorithms import Algorithm, available_algorithms, register_algorithm
from moco_jax.algorithms.moco import MoCoState
from moco_jax.setup import Setup, build, mesh_for
from moco_jax.validation import ConfigError, validate_config

__all__ = [
    "Algorithm",
    "ConfigError",
    "MoCoState",
    "Setup",
    "available_algorithms",
    "build",
    "mesh_for",
    "register_algorithm",
    "validate_config",
]
