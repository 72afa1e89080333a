"""Input: offline preparation with checksums, the real data's content, and the epoch sampler."""

import gzip

import jax
import numpy as np
import pytest
from data_fixtures import fashion_mnist_data_dir

from moco_jax.data import local_sources
from moco_jax.data.resident import ResidentTrainSet, ResidentViews, put_sharded
from moco_jax.data.tfds_source import DatasetError, load_arrays, prepared_builder
from moco_jax.mesh import make_data_mesh
from tiny import tiny_config


@pytest.fixture(scope="module")
def data_dir():
    return fashion_mnist_data_dir()


def _read_idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8)[offset:]


def test_prepared_fashion_mnist_holds_exactly_the_original_files(data_dir):
    builder = prepared_builder("fashion_mnist", data_dir)
    images, labels = load_arrays(builder, "test")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    source = local_sources.FASHION_MNIST_DIR
    raw_images = _read_idx(source / "t10k-images-idx3-ubyte.gz", 16).reshape(10000, 28, 28, 1)
    raw_labels = _read_idx(source / "t10k-labels-idx1-ubyte.gz", 8)
    # TFDS stores examples in its own order: compare (image, label) pairs as multisets.
    ours = sorted(img.tobytes() + bytes([lab]) for img, lab in zip(images, labels, strict=True))
    theirs = sorted(
        img.tobytes() + bytes([lab]) for img, lab in zip(raw_images, raw_labels, strict=True)
    )
    assert ours == theirs
    train_images, _ = load_arrays(builder, "train", limit=100)
    assert train_images.shape == (100, 28, 28, 1)
    assert builder.info.splits["train"].num_examples == 60000


def _fake_source(tmp_path, content: bytes):
    for stem in local_sources.FASHION_MNIST_CONTENT_SHA256:
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(content)
    return tmp_path


def test_damaged_local_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(local_sources, "FASHION_MNIST_DIR", _fake_source(tmp_path, b"not mnist"))
    with pytest.raises(DatasetError, match="does not match the recorded"):
        prepared_builder("fashion_mnist", str(tmp_path / "tfds"))


def test_missing_local_file_names_the_install_command(tmp_path, monkeypatch):
    source = _fake_source(tmp_path, b"x")
    (source / "train-images-idx3-ubyte.gz").unlink()
    monkeypatch.setattr(local_sources, "FASHION_MNIST_DIR", source)
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        prepared_builder("fashion_mnist", str(tmp_path / "tfds"))


def test_unknown_and_missing_datasets_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'fashoin_mnist'"):
        prepared_builder("fashoin_mnist", str(tmp_path))
    with pytest.raises(DatasetError, match="'cifar10' is not prepared .* downloading is off"):
        prepared_builder("cifar10", str(tmp_path), download=False)


def test_each_example_is_used_once_per_epoch_across_devices():
    mesh = make_data_mesh(8)
    count = 8 * 37 + 5  # not divisible: the remainder is dropped
    images = np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1)
    labels = np.arange(count, dtype=np.int32)
    sharded_images, sharded_labels, per_device = put_sharded(mesh, images, labels, pad=False)
    assert per_device == 37
    train = ResidentTrainSet(mesh, sharded_images, sharded_labels, per_device, 4, seed=0)
    assert train.steps_per_epoch == 9  # 37 // 4: the last partial batch is dropped
    epochs = []
    for epoch in range(2):
        indices = train.epoch_indices(epoch)  # [steps, 8 devices * 4]
        assert indices.shape == (9, 32)
        # Global example id = device * per_device + local index.
        device = np.repeat(np.arange(8), 4)[None, :]
        global_ids = (device * per_device + indices).ravel()
        assert len(np.unique(global_ids)) == global_ids.size  # nothing repeats in an epoch
        for d in range(8):  # each device draws only from its own examples
            local = indices[:, d * 4 : (d + 1) * 4]
            assert local.min() >= 0 and local.max() < per_device
        epochs.append(global_ids)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    np.testing.assert_array_equal(train.epoch_indices(1).ravel(), train.epoch_indices(1).ravel())
    # On the mesh once per epoch: each device holds the columns of its own examples.
    table = train.device_epoch_indices(0)
    assert table.shape == (9, 32) and table.dtype == np.int32
    for shard in table.addressable_shards:
        d = mesh.devices.tolist().index(shard.device)
        np.testing.assert_array_equal(shard.data, train.epoch_indices(0)[:, d * 4 : (d + 1) * 4])


def test_resident_views_send_nothing_per_step_and_resume_anywhere():
    """The trainer's view function under ``transfer_guard("disallow")`` across an epoch boundary
    (the epoch's index table is the one explicit transfer), and a fresh instance asked for step 4
    directly (a resume) makes exactly the views the in-order one made."""
    config = tiny_config()
    mesh = make_data_mesh(8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8 * 24, 16, 16, 1), dtype=np.uint8)
    sharded, labels, per_device = put_sharded(mesh, images, np.zeros(192, np.int32), pad=False)
    train = ResidentTrainSet(mesh, sharded, labels, per_device, config.batch_size // 8, seed=0)
    assert train.steps_per_epoch == 3
    in_order = ResidentViews(train, config)
    views = [in_order(0)]  # compiles
    with jax.transfer_guard("disallow"):
        views += [in_order(step) for step in range(1, 6)]
        with pytest.raises(Exception, match="[Dd]isallowed"):  # the guard is really on
            jax.jit(lambda x: x + 1)(np.ones(3, np.float32))
    resumed = ResidentViews(train, config)
    for step in (4, 5):
        for a, b in zip(resumed(step), views[step], strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(views[4][0]), np.asarray(views[1][0]))  # other epoch
    assert not np.array_equal(np.asarray(views[4][0]), np.asarray(views[4][1]))  # q != k
