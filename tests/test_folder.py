"""A folder of images as a dataset (``folder:ROOT``): layout mistakes, bad files, the data order.

The folder is a few dozen small JPEGs and PNGs of three colour classes (``folder_fixtures``),
written in a second; the end-to-end runs (train.py killed and resumed, ``evaluate knn``) are in
``test_folder_runs.py``.
"""

import os
import pathlib
import shutil

import numpy as np
import pytest
from folder_fixtures import CLASSES, add_bad_files, png_claiming, write_image_folder

from moco_jax.data import folder_source
from moco_jax.data.folder_source import FolderSource
from moco_jax.data.host_crops import _image_shape, _tf
from moco_jax.data.streaming import crop_dataset, records
from moco_jax.data.tfds_source import DatasetError, get_builder
from moco_jax.data.windows import EmptyWindow, full_windows
from tiny import tiny_config


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder") / "images")


@pytest.fixture
def folder(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "images")


def test_a_folder_lists_its_splits_and_sorted_classes(pristine):
    source = get_builder(f"folder:{pristine}", None)
    assert source.info.features["label"].names == list(CLASSES)
    assert {s: v.num_examples for s, v in source.info.splits.items()} == {
        "train": 48,
        "validation": 12,  # val/ reads as TFDS's validation split
    }
    paths, labels = zip(*source.records("train").as_numpy_iterator(), strict=True)
    assert len(set(paths)) == 48
    for path, label in zip(paths, labels, strict=True):  # each file under its own class
        assert path.decode().split("/")[-2] == CLASSES[label]
    # A fixed order that is not class by class (the epoch's shuffle buffer may be small).
    assert len(set(labels[:6])) > 1


def test_each_process_reads_its_own_contiguous_share(pristine):
    source = FolderSource(str(pristine))
    whole = [p for p, _ in source.records("validation").as_numpy_iterator()]
    shares = [
        [p for p, _ in source.records("validation", i, 5).as_numpy_iterator()] for i in range(5)
    ]
    assert [len(share) for share in shares] == [2] * 5  # 12 // 5, the remainder dropped
    assert sum(shares, []) == whole[:10]


def _make_unreadable(root, monkeypatch):
    real = os.scandir
    monkeypatch.setattr(  # root reads everything: permissions would not stop it
        os,
        "scandir",
        lambda path: (
            (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
            if path == os.fsencode(root)
            else real(path)
        ),
    )


LAYOUT_MISTAKES = [  # (how, the path the error names, what it says)
    ("missing", lambda r: shutil.rmtree(r), "{r}", "does not exist"),
    ("a file", lambda r: (shutil.rmtree(r), r.write_text("x")), "{r}", "is not a directory"),
    ("no train", lambda r: shutil.rmtree(r / "train"), "{r}", "has no train/ directory"),
    ("empty split", lambda r: shutil.rmtree(r / "val" / "red") or [
        shutil.rmtree(p) for p in (r / "val").iterdir()
    ], "{r}/val", "is empty: no class directories"),
    ("empty class", lambda r: (r / "train" / "purple").mkdir(), "{r}/train/purple",
     "holds no images"),
    ("file at class level", lambda r: (r / "train" / "cat.jpg").write_bytes(b"x"),
     "{r}/train/cat.jpg", "is a file where class directories belong"),
    ("nested directory", lambda r: (r / "train" / "red" / "more").mkdir(), "{r}/train/red/more",
     "is a directory inside a class directory"),
    ("unknown val class", lambda r: shutil.copytree(r / "val" / "red", r / "val" / "pink"),
     "{r}/val/pink", "is not a class of"),
]  # fmt: skip


@pytest.mark.parametrize(
    "how, named, says", [r[1:] for r in LAYOUT_MISTAKES], ids=[r[0] for r in LAYOUT_MISTAKES]
)
def test_a_layout_mistake_is_one_error_naming_the_path(folder, how, named, says):
    how(folder)
    with pytest.raises(DatasetError) as caught:
        get_builder(f"folder:{folder}", None)
    message = str(caught.value)
    assert named.format(r=folder) in message and says in message, message


def test_an_unreadable_root_is_one_error_naming_it(folder, monkeypatch):
    _make_unreadable(folder, monkeypatch)
    with pytest.raises(DatasetError, match=f"dataset folder {folder} cannot be read: Permission"):
        FolderSource(str(folder))


def _crops(source, config, batch=64):
    (crops_q, _, labels), *rest = crop_dataset(
        records(source, "train"), config, 0, 0, batch, 2, True
    ).as_numpy_iterator()
    assert not rest
    return crops_q, labels


def test_bad_files_are_skipped_never_mislabelled(folder):
    """Not an image, truncated, 0 bytes, 1x1, a 20000x20000 header, a symbolic-link loop and a
    name that is not UTF-8: each read or decode fails inside the map and the image is dropped.
    A FIFO is never opened (its read would block for ever): listed as no file, it is dropped."""
    bad = add_bad_files(folder / "train" / "red")
    os.mkfifo(folder / "train" / "red" / "pipe.jpg")
    source = FolderSource(str(folder))
    assert source.info.splits["train"].num_examples == 48 + bad + 1
    paths = [path for path, _ in source.records("train").as_numpy_iterator()]
    assert not any(path.endswith(b"pipe.jpg") for path in paths)
    config = tiny_config(**{"dataset.num_channels": 3})
    crops, labels = _crops(source, config)
    assert len(labels) == 48  # the good ones, each once
    means = crops.reshape(len(crops), -1, 3).mean(axis=1)
    colour = np.ptp(means, axis=-1) > 30  # grayscale-stored images carry no colour
    dominant = np.array([CLASSES.index(c) for c in ("red", "green", "blue")])[means.argmax(-1)]
    np.testing.assert_array_equal(dominant[colour], labels[colour])
    # Grayscale converted to the configured channels: one channel each.
    config.dataset.num_channels = 1
    assert _crops(source, config)[0].shape == (48, 16, 16, 1)


def test_the_size_bounds_are_read_from_the_header():
    """A 20000x20000 PNG is refused from its 33-byte header, before any decoding."""
    tf = _tf()
    shape = _image_shape(tf, tf.constant(png_claiming(300, 20)), 3)
    assert shape.numpy().tolist() == [20, 300]
    with pytest.raises(tf.errors.InvalidArgumentError, match="image size out of bounds"):
        _image_shape(tf, tf.constant(png_claiming(20_000, 20_000)), 3)


def test_a_window_keeps_its_place_whatever_fails():
    """Batch s is window s of the epoch's order: failed rows are filled from their own window."""
    positions = np.array([0, 1, 3, 4, 5, 6, 7, 9, 10])  # 2 and 8 failed; 11 is the tail
    rows = (positions * 10, positions)
    windows = list(full_windows([tuple(c[:4] for c in rows), tuple(c[4:] for c in rows)], 0, 3, 3))
    assert [w[1].tolist() for w in windows] == [[0, 1, 0], [3, 4, 5], [6, 7, 6]]
    assert [w[1].tolist() for w in full_windows([tuple(c[3:] for c in rows)], 1, 3, 3)] == [
        [4, 5, 4],
        [6, 7, 6],
    ]  # a resumed epoch starts at its window, whatever failed before
    with pytest.raises(EmptyWindow, match="window 1"):
        list(full_windows([(np.array([0, 1, 2, 6]),)], 0, 3, 3))


def test_a_whole_window_is_given_on_uncopied():
    """Nothing failed: each batch is its window, handed on as it is (a device-resize batch of
    unions is ~25 MB: copying it twice cost as much host time as decoding)."""
    batches = [(np.arange(3) + 10 * w, np.arange(3 * w, 3 * w + 3)) for w in range(3)]
    windows = list(full_windows(batches, 0, 3, 3))
    assert all(w[0] is b[0] for w, b in zip(windows, batches, strict=True))


def test_a_changed_folder_is_refused_with_the_count(folder):
    saved = FolderSource(str(folder)).fingerprint()
    FolderSource(str(folder)).check_unchanged(saved)  # unchanged: accepted
    (folder / "train" / "red" / "001.jpeg").unlink()
    shutil.copy(folder / "train" / "blue" / "001.jpeg", folder / "train" / "blue" / "new.jpeg")
    shutil.copy(folder / "train" / "blue" / "001.jpeg", folder / "train" / "green" / "new.jpeg")
    with pytest.raises(DatasetError, match=r"2 file\(s\) added, 1 removed \(blue: 16 -> 17"):
        FolderSource(str(folder)).check_unchanged(saved)
    (folder / "train" / "blue" / "new.jpeg").rename(folder / "train" / "blue" / "renamed.jpeg")
    changed = FolderSource(str(folder)).fingerprint()
    (folder / "train" / "blue" / "renamed.jpeg").rename(folder / "train" / "blue" / "other.jpeg")
    with pytest.raises(DatasetError, match="as many files per class but other names"):
        FolderSource(str(folder)).check_unchanged(changed)


def test_no_labelled_split_turns_the_knn_monitor_off_once(folder, caplog):
    from moco_jax.mesh import make_data_mesh
    from moco_jax.run.run_setup import load_data

    shutil.rmtree(folder / "val")
    config = tiny_config(
        **{"dataset.name": f"folder:{folder}", "dataset.num_channels": 3, "batch_size": 16}
    )
    with caplog.at_level("WARNING"):
        data = load_data(config, make_data_mesh(8))
    assert data.test_source is None and data.train_views.steps_per_epoch == 3
    assert data.num_classes == 3
    warnings = [r.getMessage() for r in caplog.records if "kNN monitor is off" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_compile_for_counts_the_splits_from_the_folder(pristine):
    from moco_jax.pod.compile_targets import dataset_sizes

    config = tiny_config(**{"dataset.name": f"folder:{pristine}", "dataset.num_channels": 3})
    sizes = dataset_sizes(config)
    assert (sizes.train, sizes.test, sizes.num_classes, sizes.stored_shape) == (48, 12, 3, None)


def test_make_folder_writes_fashion_mnist_as_jpegs(tmp_path, capsys):
    from data_fixtures import fashion_mnist_data_dir  # noqa: F401 (skips without the files)

    from moco_jax.data import local_sources, make_folder

    if not local_sources.FASHION_MNIST_DIR.exists():
        pytest.skip(f"{local_sources.FASHION_MNIST_DIR} missing")
    out = tmp_path / "fmnist"
    assert make_folder.main(["--out", str(out), "--size", "32", "--rgb", "--per_class", "2",
                             "--val_per_class", "1"]) == 0  # fmt: skip
    source = FolderSource(str(out))
    assert source.info.features["label"].names == list(make_folder.CLASS_DIRS)
    assert source.info.splits["train"].num_examples == 20
    assert source.info.splits["validation"].num_examples == 10
    config = tiny_config(**{"dataset.num_channels": 3})
    crops, labels = _crops(source, config)
    assert crops.shape == (20, 16, 16, 3) and sorted(labels.tolist()) == sorted(list(range(10)) * 2)
    assert make_folder.main(["--out", str(out)]) == 2  # not empty: refused
    # A file where the folder should go, and a path that cannot be written: one line each.
    image = min((out / "train").rglob("*.jpg"))
    for bad, says in [(image, "is not a directory"), (image / "x", "could not write"),
                      (pathlib.Path("/proc/moco_jax_folder"), "could not write")]:  # fmt: skip
        capsys.readouterr()
        assert make_folder.main(["--out", str(bad), "--per_class", "1", "--size", "8"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert folder_source.is_folder(f"folder:{out}")


def test_a_queue_larger_than_an_epoch_is_refused():
    from moco_jax.config.checks import ConfigError
    from moco_jax.run.run_setup import _check_queue

    config = tiny_config(**{"moco.queue_size": 96})
    _check_queue(config, 96)
    with pytest.raises(ConfigError, match=r"moco.queue_size \(K=96\) is larger than the 64 images"):
        _check_queue(config, 64)
