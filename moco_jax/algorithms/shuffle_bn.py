"""Shuffle-BN: permute the key batch across devices before the key encoder, undo it after.

The official code (``_batch_shuffle_ddp``) gathers every image to every GPU, draws one random
permutation of the global batch on rank 0, broadcasts it, and each GPU encodes its slice: a
key's BN batch is a random draw from the whole global batch, in expectation ``1/n`` of it from
the key's own GPU. Here the devices form groups of ``g`` (``shuffle_groups``; ``g = n``: one
group of all devices). Each device permutes its own batch, sends ``1/g`` of it to every device of
its group with one ``all_to_all`` (so each device moves only its share) and permutes what it
received; the keys travel back the same way. Each device's BN batch then holds exactly ``b/g``
random images from each device of its group: ``1/g`` of it from the key's own device, the
official ``1/n`` on ``g = n`` GPUs (``g = 8``: the paper's 8-GPU setup), whatever the slice. A
group needs ``b % g == 0`` only, not a global batch of ``n^2``.
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


def shuffle_groups(num_devices: int, group: int) -> list[list[int]] | None:
    """Device indices of each Shuffle-BN group: consecutive runs of ``group`` (neighbours on
    the mesh); ``None`` for one group of every device (``all_to_all``'s default)."""
    if group == num_devices:
        return None
    return [list(range(start, start + group)) for start in range(0, num_devices, group)]


def _exchange(x: jax.Array, axis_name: str, num_devices: int, group: int) -> jax.Array:
    """Chunk ``j`` of the batch goes to device ``j`` of the group; an involution, so it also
    undoes itself."""
    if group == 1:
        return x
    groups = shuffle_groups(num_devices, group)
    return jax.lax.all_to_all(
        x, axis_name, split_axis=0, concat_axis=0, axis_index_groups=groups, tiled=True
    )


def shuffle_batch(
    images: jax.Array, rng: jax.Array, axis_name: str, num_devices: int, group: int | None = None
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Shuffle a per-device batch across its group of devices; returns it and the function that
    un-shuffles.

    Must run inside ``shard_map`` over ``axis_name``. ``group`` devices per group (default: all
    ``num_devices``, one group) must divide ``num_devices`` and the per-device batch. The returned
    function maps per-example outputs (keys) of the shuffled batch back to the original order on
    the original device.
    """
    group = num_devices if group is None else group
    batch = images.shape[0]
    send, receive = shuffle_permutations(rng, jax.lax.axis_index(axis_name), batch)
    shuffled = _exchange(images[send], axis_name, num_devices, group)[receive]

    def unshuffle(outputs: jax.Array) -> jax.Array:
        back = _exchange(outputs[inverse_permutation(receive)], axis_name, num_devices, group)
        return back[inverse_permutation(send)]

    return shuffled, unshuffle
