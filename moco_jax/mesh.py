"""The device mesh and putting host batches on it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"  # the one mesh axis: the batch is split over it, the state is replicated


def make_data_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``num_devices`` of ``devices`` (default: all of
    ``jax.devices()``; a TPU topology's devices for compiling without the chips)."""
    devices = list(jax.devices() if devices is None else devices)
    num_devices = num_devices or len(devices)
    if num_devices > len(devices):
        raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
    return jax.make_mesh(
        (num_devices,),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Explicit,),
        devices=devices[:num_devices],
    )


def gather_replicated(local: jax.Array, axis_name: str = DATA_AXIS) -> jax.Array:
    """All devices' rows in device order, as a device-invariant value (``psum`` of a scatter).

    Inside ``shard_map``: unlike ``all_gather``, the result may be returned with ``P()``."""
    index = jax.lax.axis_index(axis_name)
    size = jax.lax.axis_size(axis_name)
    rows = local.shape[0]
    full = jax.numpy.zeros((size * rows, *local.shape[1:]), local.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, local, index * rows, axis=0)
    return jax.lax.psum(full, axis_name)


def ordered_sum(tree, axis_name: str = DATA_AXIS):
    """Inside ``shard_map``: the sum over ``axis_name`` of every device's ``tree``, added in
    float32 in device order and returned in each leaf's dtype, as a device-invariant value: the
    same bits however the devices are split into processes. (``psum``'s all-reduce adds in an
    order of its own: one host of 8 devices and two hosts of 4 differ in the last bits.) An
    all-to-all hands each device every device's copy of its 1/n of the leaves, it adds them in
    device order, and ``gather_replicated`` (exact: the other devices add zeros) reassembles the
    sums; about 1.5x the bytes of an all-reduce."""
    leaves, treedef = jax.tree.flatten(tree)
    flat = jax.numpy.concatenate([jax.numpy.ravel(leaf).astype(np.float32) for leaf in leaves])
    n = jax.lax.axis_size(axis_name)
    chunk = -(-flat.size // n)
    parts = jax.numpy.pad(flat, (0, chunk * n - flat.size)).reshape(n, chunk)
    parts = jax.lax.all_to_all(parts, axis_name, 0, 0)  # row i: device i's copy of my chunk
    total, _ = jax.lax.scan(lambda acc, part: (acc + part, None), parts[0], parts[1:])
    sums = gather_replicated(total, axis_name)[: flat.size]
    offsets = np.cumsum([0] + [leaf.size for leaf in leaves])
    return jax.tree.unflatten(
        treedef,
        [
            s.reshape(x.shape).astype(x.dtype)
            for s, x in zip(jax.numpy.split(sums, offsets[1:-1]), leaves, strict=True)
        ],
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch split along its first axis over the ``data`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(mesh: Mesh, local_batch: np.ndarray) -> jax.Array:
    """This process's rows of the global batch -> one global ``jax.Array`` on the mesh."""
    return put_process_local(batch_sharding(mesh), local_batch)


def put_process_local(sharding: NamedSharding, local_data: np.ndarray) -> jax.Array:
    """``jax.make_array_from_process_local_data`` as an explicit transfer, allowed under
    ``transfer_guard("disallow")``. In one process jax places the data with ``device_put``
    (explicit); across processes with ``make_array_from_callback``, whose transfer the guard
    counts as implicit and refuses: this placement is asked for, so it is allowed here."""
    with jax.transfer_guard("allow"):
        return jax.make_array_from_process_local_data(sharding, local_data)


def shard_views(mesh: Mesh, per_device, source_spec: P | None = None):
    """Jit ``per_device(images, source, step, rng) -> (view_q, view_k)`` over the mesh.

    ``images`` and the views are split along the batch; ``source`` (a second image batch, or the
    epoch's index table) is split as ``source_spec`` says (None: along the batch too); ``step``
    is the global step as a replicated device scalar and ``rng`` a replicated key, folded here
    with the step and then with the device index. The jitted function takes
    ``(images, source, rng, step)`` and returns ``(view_q, view_k, step + 1)``: the next step
    stays on device, so a training loop sends nothing from the host per step (``DeviceViews``).
    """

    def body(images, source, rng, step):
        rng = jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(DATA_AXIS))
        view_q, view_k = per_device(images, source, step, rng)
        return view_q, view_k, step + 1

    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(DATA_AXIS), source_spec or P(DATA_AXIS), P(), P()),
            out_specs=(P(DATA_AXIS), P(DATA_AXIS), P()),
        )
    )


class DeviceViews:
    """A ``shard_views`` function with its key and the global step held on the mesh.

    ``views(step, images, source)`` calls ``view_fn`` with the replicated key of ``seed`` and the
    device scalar for ``step``: the ``step + 1`` its previous call returned when the loop goes on
    in order, or a fresh one put on the mesh (once, at start or after a jump such as a resume).
    """

    def __init__(self, mesh: Mesh, view_fn, seed: int):
        self.mesh, self._view_fn = mesh, view_fn
        self._rng = replicate(mesh, jax.random.key(seed))
        self._step_value: jax.Array | None = None
        self._step: int | None = None

    def __call__(self, step: int, images: jax.Array, source: jax.Array):
        if self._step != step or self._step_value is None:
            self._step_value = put_replicated(self.mesh, np.asarray(step, np.int32))
        view_q, view_k, self._step_value = self._view_fn(
            images, source, self._rng, self._step_value
        )
        self._step = step + 1
        return view_q, view_k


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value held whole by every device of ``mesh``."""
    return NamedSharding(mesh, P())


def replicate(mesh: Mesh, tree):
    """A pytree of jax arrays made whole on every device (works across processes: a jitted
    identity with replicated output, not ``device_put``, which needs addressable devices)."""
    return jax.jit(lambda x: x, out_shardings=replicated(mesh))(tree)


def put_replicated(mesh: Mesh, value: np.ndarray) -> jax.Array:
    """A host value placed whole on every device of ``mesh``: an explicit transfer (allowed under
    ``transfer_guard("disallow")``) that works across processes (each passes the same value)."""
    return put_process_local(replicated(mesh), value)
