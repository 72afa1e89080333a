"""``python -m moco_jax.evaluate show``'s pictures: the neighbours drawn are the true nearest
training images by the kNN monitor's similarity (a NumPy re-computation in float64), a folder
without a labelled split is shown from its training images (never a query's own neighbour), and
a missing scikit-learn is one line.

The end-of-training pictures are checked in ``test_moco_v3_workflow.py`` and ``evaluate show`` of
a streamed workdir in ``test_folder_runs.py``.
"""

import os
import sys

import jax
import numpy as np
import pytest
from data_fixtures import fashion_mnist_data_dir
from folder_fixtures import write_image_folder

from moco_jax.data.resident import make_eval_transform
from moco_jax.evaluation.knn import make_feature_fn
from moco_jax.evaluation.monitor import collect
from moco_jax.run.run_setup import setup_run
from moco_jax.run.show import write_pictures
from moco_jax.storage import FileRefused
from tiny import tiny_config

PNG = b"\x89PNG\r\n\x1a\n"


def _backbone(run, source):
    features_fn = make_feature_fn(
        run.setup.mesh, run.setup.algorithm.model, make_eval_transform(run.config)
    )
    variables = run.setup.algorithm.encoder_variables(run.state)
    (_, features), labels = collect(source, lambda images: features_fn(variables, images))
    return np.asarray(jax.device_get(features), np.float64), np.asarray(jax.device_get(labels))


def test_the_neighbours_drawn_are_the_nearest_by_the_monitors_similarity(tmp_path):
    overrides = {"dataset.data_dir": fashion_mnist_data_dir(), "show.map_points": 64,
                 "model.backbone": "mlp", "num_devices": 2, "dataset.image_size": 28}  # fmt: skip
    config = tiny_config(**overrides)
    run = setup_run(config, tmp_path)
    try:
        shown = write_pictures(run, run.state, tmp_path, "tiny")
        bank, bank_labels = _backbone(run, run.data.bank_source)
        test, test_labels = _backbone(run, run.data.test_source)
    finally:
        run.close()
    assert [p.read_bytes()[:8] for p in shown.paths] == [PNG, PNG]
    queries = shown.query_rows
    assert len(queries) == 12 and len(set(queries.tolist())) == 12
    assert (test_labels[queries] >= 0).all()
    similarity = test[queries] @ bank.T  # cosine: the features are L2-normalised
    similarity[:, bank_labels < 0] = -np.inf
    expected = np.argsort(-similarity, axis=1, kind="stable")[:, :8]  # ties: the lower row
    picked = np.take_along_axis(similarity, shown.neighbour_rows, axis=1)
    np.testing.assert_allclose(picked, np.take_along_axis(similarity, expected, axis=1), atol=1e-6)
    np.testing.assert_array_equal(shown.neighbour_rows, expected)


def test_a_folder_without_a_labelled_split_is_shown_from_its_training_images(tmp_path):
    folder = write_image_folder(tmp_path / "images", counts=(("train", 8),))
    overrides = {
        "dataset.name": f"folder:{folder}", "dataset.num_channels": 3, "batch_size": 8,
        "dataset.mean": (0.5,) * 3, "dataset.std": (0.25,) * 3, "model.backbone": "mlp",
        "moco.queue_size": 16, "show.neighbours": 4, "show.queries": 6, "num_devices": 2,
    }  # fmt: skip
    run = setup_run(tiny_config(**overrides), tmp_path / "run")
    try:
        assert run.data.test_source is None
        shown = write_pictures(run, run.state, tmp_path, "unlabelled")
        fifo_dir = tmp_path / "fifo"  # a picture's name taken by a FIFO: refused, never opened
        fifo_dir.mkdir()
        os.mkfifo(fifo_dir / "neighbours.png")
        with pytest.raises(FileRefused, match="neighbours.png .* is a FIFO"):
            write_pictures(run, run.state, fifo_dir, "unlabelled")
    finally:
        run.close()
    assert [p.read_bytes()[:8] for p in shown.paths] == [PNG, PNG]
    assert shown.neighbour_rows.shape == (6, 4)
    assert not (shown.neighbour_rows == shown.query_rows[:, None]).any()  # never itself
    assert (shown.neighbour_rows < 24).all()


def test_without_scikit_learn_the_map_is_one_line(monkeypatch, capsys):
    from moco_jax.evaluation.pictures import tsne
    from moco_jax.run.cli_errors import run_with_clear_errors

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn.manifold: ImportError
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(SystemExit) as stop:
        run_with_clear_errors(tsne, np.zeros((8, 3)))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: embedding.png needs scikit-learn: pip install scikit-learn"]
