"""What a contrastive step reports besides its loss, the same for MoCo v1/v2 and v3."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from moco_jax.algorithms.data_parallel import DeviceMean


def contrastive_metrics(
    loss: jax.Array,
    cosines: jax.Array,
    ema_params: Any,
    online_params: Any,
    mean: DeviceMean,
    labels: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Replicated scalars of one step, inside ``shard_map``.

    ``cosines``: this device's ``[rows, candidates]`` similarities (the logits times T) and
    ``labels`` the column of each row's positive; ``None``: column 0, MoCo v1/v2's logits
    against the queue (the negatives are then the other columns as they are). ``ema_distance``:
    the L2 distance between the momentum encoder and the online weights it follows
    (``online_params``: the same tree as ``ema_params``). ``mean``: ``device_mean``.
    """
    device_avg = lambda x: mean(jnp.mean(x))
    if labels is None:
        top1 = jnp.argmax(cosines, axis=-1) == 0
        positive, negatives = cosines[:, 0], cosines[:, 1:]
    else:  # each row's mean over its negatives
        top1 = jnp.argmax(cosines, axis=-1) == labels
        positive = jnp.take_along_axis(cosines, labels[:, None], axis=1)[:, 0]
        negatives = (jnp.sum(cosines, axis=1) - positive) / (cosines.shape[1] - 1)
    squares = jax.tree.map(lambda x, y: jnp.sum(jnp.square(x - y)), ema_params, online_params)
    return {
        "loss": loss,
        "top1": device_avg(top1),
        "positive_similarity": device_avg(positive),
        "negative_similarity": device_avg(negatives),
        "ema_distance": jnp.sqrt(sum(jax.tree.leaves(squares))),
    }
