"""Weighted kNN against a plain NumPy statement of the official demo's ``knn_predict``."""

import jax
import numpy as np
import pytest

from moco_jax.data.resident import put_sharded
from moco_jax.knn import knn_predict, largest_divisor_at_most, make_knn_accuracy_fn
from moco_jax.mesh import make_data_mesh, shard_batch


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
    accuracy = make_knn_accuracy_fn(mesh, 5, k=20, temperature=0.1, chunk=4)
    bank_padded = np.concatenate([bank, np.ones((4, 8), np.float32)])
    bank_labels_padded = np.concatenate([bank_labels, -np.ones(4, np.int32)])
    ours = accuracy(shard_batch(mesh, padded), labels_sharded, bank_padded, bank_labels_padded)
    expected = np.mean(numpy_knn(test, bank, bank_labels, 5, 20, 0.1) == test_labels)
    assert ours == pytest.approx(expected)
    assert 0.5 < ours < 1.0  # the toy problem is learnable but not trivial


def test_largest_divisor():
    assert largest_divisor_at_most(7500, 512) == 500
    assert largest_divisor_at_most(13, 512) == 13
    assert largest_divisor_at_most(1031, 512) == 1  # a prime above the limit
    assert jax.device_count() == 8
