"""The streamed (large-image) input path on a tiny real TFDS dataset of JPEGs of varying size."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_augment import (
    FALLBACK_CASES,
    RANDOM_CASES,
    crop_uniforms,
    torchvision_fallback,
    torchvision_window,
)

from moco_jax.data.augment import crop_box, crop_window
from moco_jax.data.host_crops import _crop_window, _tf, tf_namespace
from moco_jax.data.streaming import StreamingViews, crop_dataset, eval_batches
from moco_jax.mesh import make_data_mesh
from moco_jax.run.trainer import train_and_evaluate
from tiny import tiny_config


def _coloured(rng, label, height, width):
    colour = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220]][label], np.float32)
    noise = rng.normal(0, 25, (height, width, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


class TinyJpegs(tfds.core.GeneratorBasedBuilder):
    """Three colour classes, JPEG-encoded, 36-63 px on a side (like photos: no fixed size)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self, features=features, supervised_keys=("image", "label")
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(160, 0), "test": self._generate_examples(30, 1)}

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)
        for index in range(count):
            height, width = rng.integers(36, 64, 2)
            yield index, {"image": _coloured(rng, index % 3, height, width), "label": index % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    TinyJpegs(data_dir=str(directory)).download_and_prepare()
    return str(directory)


def _config(data_dir, **overrides):
    return tiny_config(
        **{
            "dataset.name": "tiny_jpegs",
            "dataset.data_dir": data_dir,
            "dataset.num_channels": 3,
            "dataset.mean": (0.5, 0.5, 0.5),
            "dataset.std": (0.25, 0.25, 0.25),
            **overrides,
        }
    )


def _encode(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_undecodable_images_are_skipped_and_other_formats_decoded():
    tf = _tf()
    rng = np.random.default_rng(0)
    encoded = [
        _encode(_coloured(rng, 0, 40, 60), "JPEG"),
        b"not an image",
        _encode(_coloured(rng, 1, 50, 30), "PNG"),
        _encode(_coloured(rng, 2, 80, 80), "JPEG"),
    ]
    records = tf.data.Dataset.from_tensor_slices((encoded, np.arange(4, dtype=np.int32)))
    config = tiny_config(**{"dataset.image_size": 24})
    config.dataset.num_channels = 3
    batches = list(crop_dataset(records.enumerate(), config, 0, 0, 8).as_numpy_iterator())
    crops_q, crops_k, labels = batches[0]
    assert sorted(labels.tolist()) == [0, 2, 3]  # the broken record is gone
    assert crops_q.shape == (3, 24, 24, 3) and crops_q.dtype == np.uint8
    assert not np.array_equal(crops_q, crops_k)  # two independent crops


def _host_windows(heights, widths, uniforms, scale, ratio):
    """``crop_window`` on TensorFlow inside tf.data, as the host runs it: sizes unknown at trace
    time."""
    tf = _tf()
    ops = tf_namespace(tf)
    ds = tf.data.Dataset.from_tensor_slices((heights, widths, *uniforms))
    ds = ds.map(lambda h, w, *u: crop_window(ops, h, w, *u, scale, ratio))
    return np.stack(list(ds.as_numpy_iterator()))


@pytest.mark.parametrize("height, width, scale, ratio", RANDOM_CASES + FALLBACK_CASES)
def test_host_and_device_crop_windows_agree(height, width, scale, ratio):
    """The same uniforms give the same window on both paths, and torchvision's."""
    uniforms = crop_uniforms(3, 200)
    sizes = [np.full(200, size, np.int32) for size in (height, width)]
    host = _host_windows(*sizes, uniforms, scale, ratio)
    device = jax.vmap(lambda *u: crop_window(jnp, height, width, *u, scale, ratio))(*uniforms)
    np.testing.assert_array_equal(host, np.asarray(device))
    expected = [
        torchvision_window(height, width, scale, ratio, *u) for u in zip(*uniforms, strict=True)
    ]
    np.testing.assert_array_equal(host, np.asarray(expected))


@pytest.mark.parametrize("height, width, scale, ratio", FALLBACK_CASES)
def test_streamed_crop_fallback_is_the_device_one(height, width, scale, ratio):
    """No try fits: the host's seeded sampler gives torchvision's centred clamped crop, as the
    device's does (e.g. an 8x80 panorama: its centred 8x11, not the whole image)."""
    tf = _tf()
    seeds = np.stack([np.arange(32), np.arange(32) * 7 + 1], 1).astype(np.int64)
    shapes = np.tile(np.asarray([height, width], np.int32), (32, 1))
    ds = tf.data.Dataset.from_tensor_slices((shapes, seeds))
    ds = ds.map(lambda shape, seed: _crop_window(tf, shape, seed, scale, ratio))
    host = np.stack(list(ds.as_numpy_iterator()))
    expected = torchvision_fallback(height, width, ratio)
    np.testing.assert_array_equal(host, np.tile(expected, (32, 1)))
    device = crop_box(jax.random.key(0), height, width, scale, ratio)
    assert np.asarray(device).tolist() == expected


def test_streamed_panorama_crops_are_its_centre():
    """End to end: an 8x80 PNG panorama cropped by the host is its centred 8x11 window resized,
    in both views (every try fails at crop_scale (0.5, 1))."""
    tf = _tf()
    panorama = np.broadcast_to(np.arange(80, dtype=np.uint8)[None, :, None] * 3, (8, 80, 3))
    records = tf.data.Dataset.from_tensor_slices(
        ([_encode(panorama, "PNG")], np.zeros(1, np.int32))
    )
    config = tiny_config(**{"dataset.image_size": 16, "augment.crop_scale": (0.5, 1.0)})
    config.dataset.num_channels = 3
    batches = crop_dataset(records.enumerate(), config, 0, 0, 1).as_numpy_iterator()
    crops_q, crops_k, _ = next(batches)
    top, left, h, w = torchvision_fallback(8, 80, tuple(config.augment.crop_ratio))
    assert (top, left, h, w) == (0, 34, 8, 11)
    window = panorama[top : top + h, left : left + w].astype(np.float32)
    centre = tf.image.resize(window, [16, 16], method="bilinear", antialias=True)
    expected = np.clip(np.round(centre.numpy()), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(crops_q[0], expected)
    np.testing.assert_array_equal(crops_k[0], expected)


def test_stream_is_deterministic_and_resumes_at_any_step(data_dir):
    # Batch 64, as every two-view stream of this file (one compiled augmentation for them all):
    # two steps an epoch, so step 1 resumes inside an epoch and step 2 at the next one's start.
    config = _config(data_dir, **{"model.bn_mode": "local"})
    builder = tfds.builder("tiny_jpegs", data_dir=data_dir)
    mesh = make_data_mesh(8)
    views = StreamingViews(mesh, builder, config)
    assert views.steps_per_epoch == 2  # 160 // 64
    first = [jax.device_get(views(step)) for step in range(3)]
    for step in (1, 2):
        view_q, view_k = jax.device_get(StreamingViews(mesh, builder, config)(step))
        np.testing.assert_array_equal(view_q, first[step][0])
        np.testing.assert_array_equal(view_k, first[step][1])
    assert not np.allclose(first[0][0], first[1][0])
    assert views.skipped_images == 0


@pytest.mark.parametrize("inputs", ["two_views", "labelled_view"])
def test_resizing_on_the_device_gives_the_same_views(data_dir, inputs):
    """``dataset.resize_on="device"`` (the host sends each decoded union of windows in a 48 px
    buffer, or its views resized when larger, and the device resizes): step 0's augmented views
    within 3 grey levels of the host-resized ones (1 before augmentation, which can stretch it),
    on average within 0.01; the labels equal."""
    make = _config if inputs == "two_views" else _linear_config
    config = make(data_dir, **{"model.bn_mode": "local"})
    builder = tfds.builder("tiny_jpegs", data_dir=data_dir)
    mesh = make_data_mesh(8)
    host = jax.device_get(StreamingViews(mesh, builder, config, inputs)(0))
    config.dataset.resize_on, config.dataset.union_buffer = "device", 48
    device = jax.device_get(StreamingViews(mesh, builder, config, inputs)(0))
    level = 1 / 255 / config.dataset.std[0]
    for ours, theirs in zip(device, host, strict=True):
        assert ours.shape == theirs.shape
        diff = np.abs(ours.astype(np.float64) - theirs)
        assert diff.max() <= 3 * level + 1e-6 and diff.mean() <= 0.01 * level, (
            diff.max() / level,
            diff.mean() / level,
        )
    if inputs == "labelled_view":
        np.testing.assert_array_equal(device[1], host[1])


def test_eval_batches_are_centre_crops(data_dir):
    config = _config(data_dir)
    builder = tfds.builder("tiny_jpegs", data_dir=data_dir)
    batches = list(eval_batches(builder, "test", config, 16))
    assert [len(labels) for _, labels in batches] == [16, 14]
    assert batches[0][0].shape == (16, 16, 16, 3)


def test_pretraining_on_a_streamed_dataset(data_dir, tmp_path):
    # The MLP backbone: the streamed input is the point, and it compiles in a fraction of the time.
    config = _config(data_dir, **{"knn.k": 10, "model.backbone": "mlp"})
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["final_epoch"] == 1
    # Colour classes are easy: raw pixels and the trained encoder both separate them well.
    assert summary["knn_pixels"] > 90
    assert 0 <= summary["final_knn_head"] <= 100


def test_undecodable_images_are_counted_by_the_end_of_their_epoch(data_dir, monkeypatch):
    """4 of 160 records fail (stubbed: TFDS will not store corrupt bytes). With batch 64 an epoch
    has its 2 full batches and a dropped partial one of 32 records, so the count must come from
    finishing the epoch's stream (the dropped partial batch), not from the batches taken."""
    from moco_jax.data import streaming

    real = streaming.crop_dataset

    def failing_some(records, *args):
        return real(records.filter(lambda index, example: index % 40 != 7), *args)

    monkeypatch.setattr(streaming, "crop_dataset", failing_some)
    config = _config(data_dir, **{"model.bn_mode": "local"})
    views = StreamingViews(make_data_mesh(8), tfds.builder("tiny_jpegs", data_dir=data_dir), config)
    assert views.steps_per_epoch == 2
    counts = []
    for step in range(4):
        views(step)
        counts.append(views.skipped_images)
    assert counts == [0, 4, 4, 8]  # counted at each epoch's last step
    # A resumed run takes the count back from the checkpoint's extra and goes on from there.
    resumed = StreamingViews(views.mesh, views.builder, config)
    resumed.restore(views.checkpoint_extra())
    for step in range(4, 6):
        resumed(step)
    assert resumed.skipped_images == 12


def _linear_config(data_dir, **overrides):
    from moco_jax.config.defaults import linear_config

    config = linear_config()
    base = _config(data_dir)
    config.dataset, config.model = base.dataset, base.model
    config.model.bn_mode, config.batch_size, config.epochs = "sync", 32, 1
    config.linear.num_classes, config.optim.lr_milestones = 3, ()
    for dotted, value in overrides.items():
        section, leaf = dotted.split(".")
        config[section][leaf] = value
    return config


def test_linear_evaluation_streams_one_view_with_its_label(data_dir, tmp_path):
    """Each streamed view keeps its image's label (the colour class survives crop and flip), and
    a linear run on the stream trains and evaluates its classifier on the streamed test split."""
    from moco_jax.run.linear_eval import evaluate_linear

    config = _linear_config(data_dir, **{"optim.base_lr": 0.3, "linear.eval_every_epochs": 3})
    config.epochs = 3
    views = StreamingViews(
        make_data_mesh(8), tfds.builder("tiny_jpegs", data_dir=data_dir), config, "labelled_view"
    )
    view, labels = jax.device_get(views(0))
    assert view.shape == (32, 16, 16, 3) and labels.shape == (32,)
    dominant = np.argmax((view * 0.25 + 0.5).mean(axis=(1, 2)), axis=-1)  # un-normalised
    np.testing.assert_array_equal(dominant, labels)

    # The MLP backbone (compiles in a fraction of a ResNet's time), frozen at random init.
    config.model.backbone = "mlp"
    summary = evaluate_linear(config, str(tmp_path))
    assert summary["backbone_unchanged"] and summary["epochs"] == 3
    assert summary["test_top1"] > 60  # colour classes: easy even for random features
