"""Reading whole official MoCo checkpoints back into Flax, for the tests that compare an export
or a PyTorch run with moco_jax's state. The library reads only a file's (query / base) encoder
(``moco_jax.interop.formats.read_encoder``): both encoders, the queue and MoCo v3's predictor
are read back here alone, from the library's name maps."""

from collections.abc import Mapping
from typing import Any

import numpy as np

from moco_jax.interop import names_encoder, names_resnet
from moco_jax.interop.formats import (
    BASE_PREFIX,
    KEY_PREFIX,
    MOCO_PREFIX,
    MOMENTUM_PREFIX,
    PREDICTOR_PREFIX,
    QUERY_PREFIX,
)


def moco_checkpoint_to_flax(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An official MoCo (v1/v2, ResNet) checkpoint's ``state_dict`` -> both encoders' variables
    and the queue: ``{'encoder_q': variables, 'encoder_k': variables, 'queue': [K, D] or None,
    'queue_ptr': int or None}``; the official queue is stored ``[D, K]``."""
    result: dict[str, Any] = {
        "encoder_q": names_resnet.torch_to_flax(state_dict, QUERY_PREFIX),
        "encoder_k": names_resnet.torch_to_flax(state_dict, KEY_PREFIX),
    }
    queue = state_dict.get(f"{MOCO_PREFIX}queue")
    result["queue"] = None if queue is None else np.ascontiguousarray(np.asarray(queue).T)
    ptr = state_dict.get(f"{MOCO_PREFIX}queue_ptr")
    result["queue_ptr"] = None if ptr is None else int(np.asarray(ptr).reshape(-1)[0])
    return result


def moco_v3_to_flax(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An official moco-v3 ``state_dict`` -> ``{'base_encoder', 'momentum_encoder' (None when
    absent), 'predictor' (None when absent)}``, each ``{'params', 'batch_stats'}``."""
    names = [name for name in state_dict if isinstance(name, str)]
    base = names_encoder.torch_to_encoder(state_dict, BASE_PREFIX)
    result: dict[str, Any] = {"base_encoder": base}
    has_momentum = any(name.startswith(MOMENTUM_PREFIX) for name in names)
    result["momentum_encoder"] = (
        names_encoder.torch_to_encoder(state_dict, MOMENTUM_PREFIX) if has_momentum else None
    )
    predictor = {name: state_dict[name] for name in names if name.startswith(PREDICTOR_PREFIX)}
    result["predictor"] = None
    if predictor:
        params, stats = names_encoder.torch_to_mlp(predictor, PREDICTOR_PREFIX[:-1])
        result["predictor"] = {"params": params, "batch_stats": stats}
    return result
