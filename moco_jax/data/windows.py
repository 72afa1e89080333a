"""Batches that are fixed windows of an epoch's record order, whatever images fail to decode.

A streamed epoch is a fixed order of records; batch ``s`` is the records at positions
``[s * B, (s + 1) * B)`` of it. An image that cannot be read or decoded is dropped on the host
(tf.data's ``ignore_errors``), and its slot is filled with a copy of another image of the same
window (with its crops and label). So a bad file never moves a batch boundary: the batch of a
step is a function of the step alone, a resumed run (which skips ``s * B`` records without
decoding them) sees what an uninterrupted one saw, and every process keeps its own count of
batches without talking to the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

Columns = tuple[np.ndarray, ...]  # one row per image: crops..., label, position in the epoch


class EmptyWindow(RuntimeError):
    """Every image of a batch's window failed: there is nothing to fill it with."""


def fill(columns: Columns, size: int) -> Columns:
    """The rows of one window, the missing ones filled by repeating the present ones in order."""
    return tuple(np.resize(column, (size, *column.shape[1:])) for column in columns)


def full_windows(batches: Iterable[Columns], first: int, stop: int, size: int) -> Iterator[Columns]:
    """Windows ``first .. stop - 1`` of ``size`` rows each from ``batches`` of decoded rows in
    position order (last column: each row's position); raises ``EmptyWindow`` for a window whose
    images all failed. Rows past window ``stop - 1`` (the epoch's partial tail) are dropped. A
    batch that is exactly one whole window (nothing failed) is given on as it is, uncopied."""
    window, pending = first, None
    for batch in batches:
        if pending is not None and len(pending[-1]):
            batch = tuple(map(np.concatenate, zip(pending, batch, strict=True)))
        pending = batch
        while window < stop and len(pending[-1]) and _ready(pending[-1], window, size):
            pending, done = _take(pending, window, size)
            yield done
            window += 1
    while window < stop:  # the stream ended: what is left completes the last windows
        pending, done = _take(pending, window, size)
        yield done
        window += 1


def _ready(positions: np.ndarray, window: int, size: int) -> bool:
    """Whether ``window``'s rows are all in: a later window's row has come, or all ``size``."""
    return positions[-1] // size > window or _count(positions, window, size) == size


def _count(positions: np.ndarray, window: int, size: int) -> int:
    """Rows of ``window`` at the head of ``positions`` (increasing, none of an earlier window)."""
    return int(np.searchsorted(positions, (window + 1) * size))


def _take(pending: Columns | None, window: int, size: int) -> tuple[Columns | None, Columns]:
    count = 0 if pending is None else _count(pending[-1], window, size)
    if not count:
        raise EmptyWindow(f"all {size} images of batch window {window} failed to decode")
    if count == size == len(pending[-1]):  # exactly this window: no slicing
        return tuple(column[:0] for column in pending), pending
    done = tuple(column[:count] for column in pending)
    return tuple(column[count:] for column in pending), done if count == size else fill(done, size)
