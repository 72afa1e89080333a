"""Weighted kNN against a plain NumPy statement of the official demo's ``knn_predict``."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moco_jax.data.resident import put_sharded
from moco_jax.evaluation import knn
from moco_jax.evaluation.knn import (
    BLOCK,
    accuracy_of,
    largest_divisor_at_most,
    make_knn_counts_fn,
)
from moco_jax.mesh import DATA_AXIS, make_data_mesh, shard_batch


def knn_predict(features, bank, bank_labels, num_classes, k=200, temperature=0.1):
    """Predicted labels of ``features [M, D]`` by weighted vote of their ``k`` nearest in
    ``bank``, the whole bank on one device: the reference for the sharded kNN. Bank rows with
    label -1 (padding) never vote; among equal similarities the lower bank row is taken first."""
    return knn.vote(*knn.ranked(features, bank, bank_labels, k), num_classes, temperature)


def make_knn_predict_fn(mesh, num_classes, k, temperature, block=BLOCK):
    """Jitted ``(test_feats, bank, bank_labels) -> predictions`` of the monitor's sharded kNN
    (``make_knn_counts_fn`` before it counts), everything sharded over ``data``."""

    def per_device(features, bank, bank_labels):
        return knn.sharded_predict(features, bank, bank_labels, num_classes, k, temperature, block)

    return knn.jit_rows_sharded(mesh, per_device, 3, P(DATA_AXIS))


def make_knn_accuracy_fn(mesh, num_classes, k, temperature, block=BLOCK):
    """``(test_feats, test_labels, bank, bank_labels) -> top-1 accuracy``, as the monitor has it."""
    fn = make_knn_counts_fn(mesh, num_classes, k, temperature, block)
    return lambda *args: accuracy_of(fn, *args)


def numpy_knn(features, bank, bank_labels, num_classes, k, t):
    predictions = []
    for f in features:
        sims = bank @ f
        top = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for i in top:
            scores[bank_labels[i]] += np.exp(sims[i] / t)
        predictions.append(int(np.argmax(scores)))
    return np.array(predictions)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((5, 8)))
    bank_labels = rng.integers(0, 5, 300)
    bank = _unit(centres[bank_labels] + 0.6 * rng.standard_normal((300, 8))).astype(np.float32)
    test_labels = rng.integers(0, 5, 77)
    test = _unit(centres[test_labels] + 0.6 * rng.standard_normal((77, 8))).astype(np.float32)
    return bank, bank_labels.astype(np.int32), test, test_labels.astype(np.int32)


@pytest.mark.parametrize("k,t", [(200, 0.1), (5, 0.5), (1, 0.1)])
def test_knn_predict_matches_numpy(toy, k, t):
    bank, bank_labels, test, _ = toy
    ours = np.asarray(knn_predict(test, bank, bank_labels, 5, k, t))
    np.testing.assert_array_equal(ours, numpy_knn(test, bank, bank_labels, 5, k, t))


def test_known_answer():
    bank = np.eye(3, dtype=np.float32)
    labels = np.array([0, 1, 2], np.int32)
    queries = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.9]], np.float32)
    np.testing.assert_array_equal(knn_predict(_unit(queries), bank, labels, 3, k=2), [0, 2])


def test_sharded_accuracy_with_padding_equals_numpy(toy):
    """77 test rows on 8 devices: padded rows (label -1) neither count nor vote."""
    bank, bank_labels, test, test_labels = toy
    mesh = make_data_mesh(8)
    _, labels_sharded, per_device = put_sharded(
        mesh, np.zeros((77, 1), np.uint8), test_labels, pad=True
    )
    assert per_device == 10
    padded = np.concatenate([test, np.zeros((3, 8), np.float32)])
    accuracy = make_knn_accuracy_fn(mesh, 5, k=20, temperature=0.1, block=1)
    bank_padded = np.concatenate([bank, np.ones((4, 8), np.float32)])
    bank_labels_padded = np.concatenate([bank_labels, -np.ones(4, np.int32)])
    ours = accuracy(shard_batch(mesh, padded), labels_sharded, bank_padded, bank_labels_padded)
    expected = np.mean(numpy_knn(test, bank, bank_labels, 5, 20, 0.1) == test_labels)
    assert ours == pytest.approx(expected)
    assert 0.5 < ours < 1.0  # the toy problem is learnable but not trivial


@pytest.fixture(scope="module")
def tied():
    """Integer vectors: every similarity is an exact small integer, so many tie exactly, among
    them duplicated bank rows with different labels. 300 bank rows plus 4 padding rows (label
    -1) placed among them, twice test rows 0-3 (their nearest by far, if they voted); 77 test
    rows plus 3 padding rows: 304 and 80 rows, 38 and 10 per device on 8."""
    rng = np.random.default_rng(1)
    bank = rng.integers(-1, 2, (300, 6)).astype(np.float32)
    bank[150:200] = bank[:50]  # the same vectors again, most with other labels
    bank_labels = rng.integers(0, 5, 300).astype(np.int32)
    test = rng.integers(-1, 2, (77, 6)).astype(np.float32)
    test_labels = rng.integers(0, 5, 77).astype(np.int32)
    at = [0, 37, 38, 250]
    return SimpleNamespace(
        bank=bank,
        bank_labels=bank_labels,
        test=test,
        test_labels=test_labels,
        padded_bank=np.insert(bank, at, 2 * test[:4], axis=0),
        padded_bank_labels=np.insert(bank_labels, at, -1),
        padded_test=np.concatenate([test, test[:3]]),
        padded_test_labels=np.concatenate([test_labels, -np.ones(3, np.int32)]),
    )


@pytest.mark.parametrize("k,t", [(1, 0.5), (5, 0.5), (200, 1.0)])
def test_sharded_predictions_equal_replicated_with_ties(tied, k, t):
    """The bank stays sharded (38 rows a device, k=200 above that) and the predictions are those
    of the whole-bank ``knn_predict``, ties included (the lower bank row first), and of NumPy."""
    mesh = make_data_mesh(8)
    sharded_bank = shard_batch(mesh, tied.padded_bank)
    assert sharded_bank.sharding.spec[0] == DATA_AXIS
    assert {s.data.shape for s in sharded_bank.addressable_shards} == {(38, 6)}
    predict = make_knn_predict_fn(mesh, 5, k, t, block=608)  # 2 test rows a device per step
    ours = np.asarray(
        predict(
            shard_batch(mesh, tied.padded_test),
            sharded_bank,
            shard_batch(mesh, tied.padded_bank_labels),
        )
    )[:77]
    replicated = knn_predict(tied.padded_test, tied.padded_bank, tied.padded_bank_labels, 5, k, t)
    np.testing.assert_array_equal(ours, np.asarray(replicated)[:77])
    np.testing.assert_array_equal(ours, numpy_knn(tied.test, tied.bank, tied.bank_labels, 5, k, t))
    # The ties matter: taking the higher bank row first changes some predictions.
    reversed_rule = numpy_knn(tied.test, tied.bank[::-1], tied.bank_labels[::-1], 5, k, t)
    if k < 200:
        assert np.any(ours != reversed_rule)


def _on_mesh(mesh, tied):
    """``(test, test_labels, bank, bank_labels)``, padded, each with rows sharded over ``data``."""
    names = ("padded_test", "padded_test_labels", "padded_bank", "padded_bank_labels")
    return [shard_batch(mesh, getattr(tied, name)) for name in names]


def test_sharded_accuracy_counts_only_real_test_rows(tied):
    mesh = make_data_mesh(8)
    accuracy = make_knn_accuracy_fn(mesh, 5, k=5, temperature=0.5, block=608)
    ours = accuracy(*_on_mesh(mesh, tied))
    expected = knn_predict(tied.padded_test, tied.padded_bank, tied.padded_bank_labels, 5, 5, 0.5)
    assert ours == pytest.approx(np.mean(np.asarray(expected)[:77] == tied.test_labels))


def test_bank_of_several_batches_ties_in_concatenated_order(tied):
    """The monitor's bank is ``jnp.concatenate`` of a source's batches, each sharded over
    ``data``: the result is still rows sharded over ``data`` (1/8 a device) and ties go to the
    lower row of the concatenation, as ``knn_predict`` on the host batches concatenated."""
    mesh = make_data_mesh(8)
    halves = [
        (tied.padded_bank[s], tied.padded_bank_labels[s]) for s in (slice(152, None), slice(0, 152))
    ]
    bank = jnp.concatenate([shard_batch(mesh, b) for b, _ in halves])
    bank_labels = jnp.concatenate([shard_batch(mesh, y) for _, y in halves])
    assert bank.sharding.spec[0] == DATA_AXIS
    assert {s.data.shape for s in bank.addressable_shards} == {(38, 6)}
    ours = make_knn_predict_fn(mesh, 5, 5, 0.5, block=608)(
        shard_batch(mesh, tied.padded_test), bank, bank_labels
    )
    host_bank = np.concatenate([b for b, _ in halves])
    host_labels = np.concatenate([y for _, y in halves])
    expected = knn_predict(tied.padded_test, host_bank, host_labels, 5, 5, 0.5)
    np.testing.assert_array_equal(np.asarray(ours)[:77], np.asarray(expected)[:77])
    # The halves are swapped: in the original row order other tied neighbours win.
    original = knn_predict(tied.padded_test, tied.padded_bank, tied.padded_bank_labels, 5, 5, 0.5)
    assert np.any(np.asarray(original)[:77] != np.asarray(expected)[:77])


def test_no_device_holds_the_whole_bank(tied):
    """The compiled per-device program takes a [38, 6] bank block and has no buffer of the whole
    bank's [304, 6] shape (it is never all-gathered); what it all-gathers is a [16, 6] block of
    test rows."""
    mesh = make_data_mesh(8)
    counts = make_knn_counts_fn(mesh, 5, 200, 1.0, block=608)
    hlo = counts.lower(*_on_mesh(mesh, tied)).compile().as_text()
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    assert "f32[38,6]" in entry and "s32[38]" in entry
    assert "[304,6]" not in hlo and "[304]" not in hlo
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    assert gathers and all("f32[16,6]" in line.split("=")[1] for line in gathers)


def test_largest_divisor():
    assert largest_divisor_at_most(7500, 512) == 500
    assert largest_divisor_at_most(13, 512) == 13
    assert largest_divisor_at_most(1031, 512) == 1  # a prime above the limit
    assert jax.device_count() == 8
