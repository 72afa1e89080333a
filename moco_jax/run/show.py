"""Pictures of what a run learned: ``python -m moco_jax.evaluate show --workdir W [--step N]``
(or ``--config C --pretrained FILE --workdir OUT`` for PyTorch weights), and after training
(``config.show.at_end``, datasets kept on the devices).

- ``neighbours.png``: ``show.queries`` test images drawn at random (``show.seed``), each followed
  by its ``show.neighbours`` nearest training images by the backbone features the kNN monitor
  uses (``evaluation.neighbours``), framed green when of the query's class, red when not.
- ``embedding.png``: t-SNE of ``show.map_points`` test images' backbone features beside the same
  map of their raw pixels (the kNN pixel baseline's features), coloured by class.

Images are drawn as the model sees them before normalisation (a streamed dataset's centre
crops). A dataset without a labelled split (a folder without ``val/``) is shown from its
training images: queries from them (never their own neighbour), no frames, one colour.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from moco_jax import storage
from moco_jax.data.resident import ResidentViews, make_eval_transform
from moco_jax.evaluation.knn import make_feature_fn
from moco_jax.evaluation.monitor import collect, small_pixel_features
from moco_jax.evaluation.neighbours import nearest, rows_of, take_rows
from moco_jax.evaluation.pictures import draw_maps, draw_neighbours, tsne

NEIGHBOURS, EMBEDDING = "neighbours.png", "embedding.png"


@dataclasses.dataclass
class Shown:
    """What ``write_pictures`` drew: the files, and the rows of the query split and of the
    training split (as ``monitor.collect`` orders them) in ``neighbours.png``."""

    paths: list[epath.Path]
    query_rows: np.ndarray  # [queries]
    neighbour_rows: np.ndarray  # [queries, neighbours], most similar first


def write_pictures(run: Any, state: Any, directory: epath.Path, title: str) -> Shown:
    """Both pictures of ``state``'s encoder on ``run``'s data, into ``directory`` (neighbours
    first: without scikit-learn the map raises ``MissingExtra`` after it)."""
    config, data = run.config, run.data
    show = config.show
    labelled = data.test_source is not None
    queries_from = data.test_source if labelled else data.bank_source
    features_fn = (
        run.monitor.features_fn
        if run.monitor
        else make_feature_fn(run.setup.mesh, run.setup.algorithm.model, make_eval_transform(config))
    )  # the monitor's, already compiled, when the run has one
    variables = run.setup.algorithm.encoder_variables(state)

    def backbone(source, split):
        (_, feats), labels = collect(_with_progress(source, split),
                                     lambda images: features_fn(variables, images))  # fmt: skip
        return feats, labels

    t0 = time.time()
    bank, bank_labels = backbone(data.bank_source, "train")
    tested, tested_labels = backbone(queries_from, "test") if labelled else (bank, bank_labels)
    valid = np.flatnonzero(jax.device_get(tested_labels) >= 0)  # padding rows are -1
    rng = np.random.default_rng(show.seed)
    rows = rng.choice(valid, min(show.queries, len(valid)), replace=False)
    k = min(show.neighbours, len(valid) - (0 if labelled else 1))
    exclude = None if labelled else rows
    _, found = nearest(take_rows(tested, rows), bank, bank_labels, k, exclude)
    mapped = rng.choice(valid, min(show.map_points, len(valid)), replace=False)
    # The queries' and the map's images in one pass over their split (a streamed one is read).
    fetched_images, fetched_labels = rows_of(queries_from, np.concatenate([rows, mapped]))
    query_images, map_images = fetched_images[: len(rows)], fetched_images[len(rows) :]
    query_labels, map_labels = fetched_labels[: len(rows)], fetched_labels[len(rows) :]
    images, labels = rows_of(data.bank_source, found)
    names = _class_names(data)
    written = [epath.Path(directory) / NEIGHBOURS, epath.Path(directory) / EMBEDDING]
    storage.write_whole(written[0], draw_neighbours(
        query_images, query_labels if labelled else None,
        images.reshape(*found.shape, *images.shape[1:]),
        labels.reshape(found.shape) if labelled else None, names,
        f"{title}: test images (left) and their {k} nearest training images",
    ), "neighbours.png")  # fmt: skip
    pixels = np.asarray(small_pixel_features(jax.numpy.asarray(map_images)))
    maps = [
        ("backbone features", tsne(take_rows(tested, mapped), show.seed)),
        ("raw pixels", tsne(pixels, show.seed)),
    ]
    which = "test" if labelled else "training (no labelled split)"
    png = draw_maps(maps, map_labels if labelled else None, names,
                    f"{title}: t-SNE of {len(mapped)} {which} images")  # fmt: skip
    storage.write_whole(written[1], png, "embedding.png")
    logging.info("wrote %s (%.0fs)", ", ".join(map(str, written)), time.time() - t0)
    return Shown(written, rows, found)


def write_at_end(run: Any, state: Any) -> None:
    """``config.show.at_end``: the pictures beside ``pretraining.png``, for a dataset kept on
    the devices, in one process (a streamed one would be read twice more: ``evaluate show`` does
    it on demand, on one host).
    Without scikit-learn the map is skipped with a warning; training's results stand."""
    from moco_jax.evaluation.pictures import MissingExtra

    resident = isinstance(run.train_views, ResidentViews)
    if not run.config.show.at_end or not resident or jax.process_count() > 1:
        return
    try:
        write_pictures(run, state, run.workdir, f"{run.config.dataset.name}, step {state.step}")
    except MissingExtra as err:
        logging.warning("%s (neighbours.png written)", err)


def _class_names(data: Any) -> list[str]:
    """The dataset's class names (TFDS metadata, a folder's directories), else the numbers."""
    names = list(data.class_names)
    return names if len(names) == data.num_classes else [str(c) for c in range(data.num_classes)]


def _with_progress(source, split: str):
    """``source`` with a progress bar over its batches (features of a streamed split take
    minutes)."""
    from tqdm.auto import tqdm

    return lambda: tqdm(source(), desc=f"features ({split})", unit="batch", leave=False)
