"""What each piece of moco_jax's host input costs, per image per core (``--breakdown``).

The pieces are the library's own steps (``host_crops.crop_steps``: read, locate, decode, crop,
resize; with ``resize="device"``: read, locate, decode, pack), then ``streaming.crop_dataset``
(shuffle, batching, the error filter, prefetch) and the trainer's consumer (``StreamingViews``:
to NumPy, the fixed batch windows, ``shard_batch`` to the device). Each prefix of that chain
runs as a tf.data pipeline over the whole folder, in the process this runs in (pinned to the
cores it is given, tf.data's private pool that size); a piece's cost is the CPU time of its
prefix minus the one before, per image. "locate" is the image's size read from its header, both
crop windows and their union; "crop" cuts the windows out of the decoded union; "pack" hands the
union on with the windows' boxes (or resizes the views of a union too large for the buffer).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.host_sides import _moco_v2_config

REPEATS = 2  # each prefix timed this many times; the lowest CPU time counts


def _rows(item) -> int:
    """Images in one item: a batch of crops (a tuple of columns) or of per-image numbers."""
    return len(item[0]) if isinstance(item, tuple) else len(item)


def _cpu_per_image(make_iterator, rows, hand_off=len) -> float:
    """CPU seconds per image after the first item (``rows(item)`` images each), over one pass
    of a fresh iterator."""
    iterator = make_iterator()
    hand_off(next(iterator))
    start, count = time.process_time(), 0
    for item in iterator:
        hand_off(item)
        count += rows(item)
    return (time.process_time() - start) / max(count, 1)


def time_pieces(root: str, cores: int, batch: int, resize: str = "host") -> dict[str, Any]:
    """``{piece: CPU milliseconds per image}`` on ``cores`` (see the module docstring)."""
    from moco_jax.data.host_crops import _tf, chain, crop_steps
    from moco_jax.data.streaming import StreamingViews, crop_dataset, records, with_threads

    tf = _tf()
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    tf.config.threading.set_intra_op_parallelism_threads(cores)
    import jax

    from moco_jax.data.tfds_source import get_builder
    from moco_jax.mesh import make_data_mesh, shard_batch

    config = _moco_v2_config(root, batch, cores, resize)
    builder = get_builder(config.dataset.name, None)
    steps = crop_steps(config, 0, 2, from_files=True)
    stages = {}

    def first(x):  # a number that needs ``x``'s value (a size would be folded when static)
        if x.dtype == tf.string:
            return tf.cast(tf.strings.length(x), tf.int64)
        return tf.reduce_sum(tf.cast(tf.reshape(x, [-1])[:1], tf.int64))

    def sizes(*value):  # every output computed; Python gets one number per image
        return tf.add_n([first(x) for x in tf.nest.flatten(value)])

    for k, (name, _) in enumerate(steps, 1):
        prefix = chain(steps[:k])
        stages[name] = lambda prefix=prefix: iter(
            with_threads(
                records(builder, "train")
                .map(lambda *record, prefix=prefix: sizes(*prefix(*record)),
                     num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch),
                cores,
            )
        )  # fmt: skip
    stages["batching"] = lambda: iter(
        crop_dataset(records(builder, "train"), config, 0, 0, batch, 2, True, True)
    )
    mesh = make_data_mesh(1)
    views = StreamingViews(mesh, builder, config)

    def hand_off(crops):
        jax.block_until_ready(jax.tree.map(lambda rows: shard_batch(mesh, rows), crops))

    cumulative = {}
    for name, make in stages.items():
        cumulative[name] = min(_cpu_per_image(make, _rows) for _ in range(REPEATS))
    cumulative["hand-off"] = min(
        _cpu_per_image(lambda: views._epoch_batches(0, 0), _rows, hand_off) for _ in range(REPEATS)
    )
    pieces, before = {}, 0.0
    for name, seconds in cumulative.items():
        pieces[name] = 1e3 * (seconds - before)
        before = seconds
    return {"ms_per_image": pieces, "total_ms": 1e3 * before}
