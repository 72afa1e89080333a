"""moco_jax: MoCo v1/v2/v3 (Momentum Contrast) in JAX/Flax for TPU, GPU and CPU.

The names below load their modules on first use (PEP 562), so that reading a config file or a
command line (``moco_jax.config.defaults``, ``moco_jax.run.cli_errors``) does not import JAX and
Flax: a bad command line fails in a fraction of a second.
"""

import importlib

_EXPORTS = {
    "Algorithm": "moco_jax.algorithms",
    "available_algorithms": "moco_jax.algorithms",
    "register_algorithm": "moco_jax.algorithms",
    "MoCoState": "moco_jax.algorithms.moco",
    "Setup": "moco_jax.assemble",
    "build": "moco_jax.assemble",
    "mesh_for": "moco_jax.assemble",
    "ConfigError": "moco_jax.config.checks",
    "validate_config": "moco_jax.config.validation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moco_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
