"""moco_jax: MoCo v1/v2 (Momentum Contrast) in JAX/Flax for TPU, GPU and CPU."""

from moco_jax.engine import Engine, build_engine
from moco_jax.state import MoCoState, create_state
from moco_jax.validation import ConfigError, validate_config

__all__ = ["ConfigError", "Engine", "MoCoState", "build_engine", "create_state", "validate_config"]
