"""MoCo v3's momentum coefficient schedule (moco-v3 ``main_moco.py``, ``adjust_moco_momentum``).

With ``--moco-m-cos`` the momentum encoder's m rises from ``m0`` to 1 with a half-cycle cosine
in the fractional epoch ``e = step / steps_per_epoch``:
``m = 1 - 0.5 * (1 + cos(pi * e / epochs)) * (1 - m0)``, set before every iteration. That is
``1 - c(step)`` with ``c`` optax's cosine decay from ``1 - m0`` to 0 over ``epochs *
steps_per_epoch`` steps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def momentum_schedule(
    m0: float, cosine: bool, steps_per_epoch: int, epochs: int
) -> Callable[[jax.Array], jax.Array]:
    """``step -> m`` (float32): ``m0`` throughout, or the half-cycle cosine to 1 (``cosine``)."""
    if not cosine:
        return lambda step: jnp.float32(m0) + 0.0 * jnp.asarray(step, jnp.float32)
    gap = optax.cosine_decay_schedule(1.0 - m0, epochs * steps_per_epoch)
    return lambda step: (1.0 - gap(step)).astype(jnp.float32)
