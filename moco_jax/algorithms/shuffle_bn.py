"""Shuffle-BN: permute the key batch across devices before the key encoder, undo it after.

The official code gathers every image to every GPU and each takes a random slice. Here each
device permutes its own batch, sends ``1/n`` of it to every other device with one ``all_to_all``
(so each device moves only its share) and permutes what it received; the keys travel back the same
way. With ``n`` devices each device's BN batch then holds ``b/n`` random images from each device,
and within a device the receive permutation randomises the BN groups.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def shuffle_permutations(
    rng: jax.Array, device_index: jax.Array | int, batch: int
) -> tuple[jax.Array, jax.Array]:
    """The (send, receive) permutations of one device's ``batch`` key images for this step."""
    send = jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(rng, 0), device_index), batch
    )
    receive = jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(rng, 1), device_index), batch
    )
    return send, receive


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """``inv`` with ``x[perm][inv] == x``."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _exchange(x: jax.Array, axis_name: str, num_devices: int) -> jax.Array:
    """Chunk ``j`` of the batch goes to device ``j``; an involution, so it also undoes itself."""
    if num_devices == 1:
        return x
    return jax.lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0, tiled=True)


def shuffle_batch(
    images: jax.Array, rng: jax.Array, axis_name: str, num_devices: int
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Shuffle a per-device batch across devices; returns it and the function that un-shuffles.

    Must run inside ``shard_map`` over ``axis_name``. The per-device batch must be divisible by
    ``num_devices``. The returned function maps per-example outputs (keys) of the shuffled batch
    back to the original order on the original device.
    """
    batch = images.shape[0]
    send, receive = shuffle_permutations(rng, jax.lax.axis_index(axis_name), batch)
    shuffled = _exchange(images[send], axis_name, num_devices)[receive]

    def unshuffle(outputs: jax.Array) -> jax.Array:
        back = _exchange(outputs[inverse_permutation(receive)], axis_name, num_devices)
        return back[inverse_permutation(send)]

    return shuffled, unshuffle
