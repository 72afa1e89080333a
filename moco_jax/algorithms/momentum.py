"""The momentum (key) encoder: an exponential moving average of the query encoder's weights."""

from __future__ import annotations

from typing import Any

import optax


def momentum_update(online: Any, target: Any, momentum: float) -> Any:
    """``target * m + online * (1 - m)``, leaf by leaf (``_momentum_update_key_encoder``).

    Applied to parameters only: the key encoder's BatchNorm statistics come from its own forward
    passes, as in the reference.
    """
    return optax.incremental_update(online, target, 1.0 - momentum)
