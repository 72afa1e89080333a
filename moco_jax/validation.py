"""Up-front config checks: a clear, specific error before anything is compiled."""

from __future__ import annotations

from typing import Any

from moco_jax.models import available_backbones
from moco_jax.models.encoder import DTYPES
from moco_jax.models.heads import HEADS
from moco_jax.step import BN_MODES

SCHEDULES = ("cosine", "step", "constant")


class ConfigError(ValueError):
    """A config value that cannot work, with the field name in the message."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(config: Any, num_devices: int) -> None:
    """Raise ``ConfigError`` naming the first field that is wrong for a run on ``num_devices``."""
    m, moco, optim = config.model, config.moco, config.optim
    for name, value in [
        ("batch_size", config.batch_size),
        ("epochs", config.epochs),
        ("model.dim", m.dim),
        ("moco.queue_size", moco.queue_size),
        ("dataset.image_size", config.dataset.image_size),
        ("dataset.num_channels", config.dataset.num_channels),
    ]:
        _require(_is_int(value) and value >= 1, f"{name} must be a positive integer, got {value!r}")
    _require(
        _is_int(m.bn_group_size) and m.bn_group_size >= 0,
        f"model.bn_group_size must be an integer >= 0, got {m.bn_group_size!r}",
    )
    _require(
        m.backbone in available_backbones(),
        f"model.backbone: unknown backbone {m.backbone!r}; available: "
        + ", ".join(available_backbones()),
    )
    _require(m.head in HEADS, f"model.head must be one of {sorted(HEADS)}, got {m.head!r}")
    _require(m.dtype in DTYPES, f"model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}")
    _require(
        m.bn_mode in BN_MODES, f"model.bn_mode must be one of {list(BN_MODES)}, got {m.bn_mode!r}"
    )
    _require(
        _is_number(m.width_multiplier) and round(64 * m.width_multiplier) >= 1,
        f"model.width_multiplier must give at least one channel (64 x it >= 1), "
        f"got {m.width_multiplier!r}",
    )
    _require(
        _is_number(moco.temperature) and moco.temperature > 0,
        f"moco.temperature must be > 0, got {moco.temperature!r}",
    )
    _require(
        _is_number(moco.momentum) and 0.0 <= moco.momentum <= 1.0,
        f"moco.momentum must be in [0, 1], got {moco.momentum!r}",
    )
    _require(
        _is_number(optim.base_lr) and optim.base_lr > 0,
        f"optim.base_lr must be > 0, got {optim.base_lr!r}",
    )
    _require(
        _is_number(optim.weight_decay) and optim.weight_decay >= 0,
        f"optim.weight_decay must be >= 0, got {optim.weight_decay!r}",
    )
    _require(
        _is_number(optim.momentum) and 0.0 <= optim.momentum < 1.0,
        f"optim.momentum must be in [0, 1), got {optim.momentum!r}",
    )
    _require(
        optim.schedule in SCHEDULES,
        f"optim.schedule must be one of {list(SCHEDULES)}, got {optim.schedule!r}",
    )

    # Cross-field rules.
    _require(num_devices >= 1, f"need at least one device, got {num_devices}")
    _require(
        config.batch_size % num_devices == 0,
        f"batch_size {config.batch_size} is not divisible by the {num_devices} devices",
    )
    _require(
        moco.queue_size >= config.batch_size,
        f"moco.queue_size (K={moco.queue_size}) must be >= the global batch_size "
        f"({config.batch_size}): each step enqueues the whole global batch of keys",
    )
    per_device = config.batch_size // num_devices
    if m.bn_mode == "shuffle":
        _require(
            per_device % num_devices == 0,
            f"bn_mode 'shuffle' sends 1/{num_devices} of each device's batch to every device: "
            f"the per-device batch ({per_device}) must be divisible by {num_devices}",
        )
    if m.bn_mode == "sync":
        _require(
            m.bn_group_size == 0,
            "model.bn_group_size must be 0 with bn_mode 'sync' (statistics span the global batch)",
        )
    if m.bn_group_size:
        _require(
            per_device % m.bn_group_size == 0,
            f"model.bn_group_size {m.bn_group_size} does not divide the per-device batch "
            f"{per_device} (batch_size {config.batch_size} / {num_devices} devices)",
        )
