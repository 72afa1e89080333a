"""Finding, preparing and reading TFDS datasets by name, with clear errors when they are missing."""

from __future__ import annotations

import os

import numpy as np

from moco_jax.data.local_sources import LocalSourceError, prepare_from_local

KNOWN_DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenette", "imagenet2012")
# Small enough to keep on the accelerator as uint8 and augment entirely on device.
RESIDENT_DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100")


class DatasetError(RuntimeError):
    """The dataset cannot be found, prepared or used as configured."""


def _quiet_tensorflow():
    """Import TensorFlow without letting it grab accelerators or print start-up noise."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None
    return tf


def holds_paths(builder) -> bool:
    """Whether ``builder``'s records hold file paths (a folder of images: ``FolderSource``)
    rather than encoded images (a TFDS builder)."""
    return getattr(builder, "holds_paths", False)


def get_builder(name: str, data_dir: str | None):
    """The TFDS builder of ``name`` (not necessarily prepared); a clear error if unknown.
    ``folder:ROOT`` names a folder of images (``folder_source.FolderSource``, listed now)."""
    _quiet_tensorflow()
    from moco_jax.data.folder_source import FolderSource, folder_root, is_folder

    if is_folder(name):
        return FolderSource(folder_root(name))
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise DatasetError(
            f"unknown dataset {name!r}: not a TFDS dataset name (tested here: "
            f"{', '.join(KNOWN_DATASETS)})"
        ) from err


def prepared_builder(name: str, data_dir: str | None, download: bool = True):
    """The TFDS builder of ``name``, prepared once (cached in ``data_dir``); a folder's source."""
    import tensorflow_datasets as tfds

    builder = get_builder(name, data_dir)
    if holds_paths(builder) or builder.is_prepared():
        return builder
    try:
        if prepare_from_local(name, data_dir):
            return tfds.builder(name, data_dir=data_dir)
    except LocalSourceError as err:
        raise DatasetError(f"preparing {name} from local files failed: {err}") from err
    hint = {
        "fashion_mnist": "offline: sudo apt-get install dataset-fashion-mnist",
        "imagenet2012": "download ILSVRC2012_img_{train,val}.tar into <data_dir>/downloads/manual",
    }.get(name, f"run `tfds build {name}` on a machine with internet")
    if not download:
        raise DatasetError(
            f"dataset {name!r} is not prepared in {builder.data_dir_root} and downloading is "
            f"off (dataset.download=False); {hint}"
        )
    try:
        builder.download_and_prepare()
    except Exception as err:  # network errors, missing manual files, ...
        raise DatasetError(
            f"dataset {name!r} is not prepared in {builder.data_dir_root} and could not be "
            f"downloaded or prepared ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"{hint}"
        ) from err
    return builder


def load_arrays(builder, split: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """This process's share of ``split`` as uint8 images ``[n, H, W, C]`` and int32 labels.

    ``limit`` > 0 keeps only the first ``limit`` examples of the split, of which each of several
    processes reads its even share (``tfds.split_for_jax_process``): the same examples, in the
    same order across the devices, whatever the number of processes.
    """
    import jax
    import tensorflow_datasets as tfds

    # Read only the first ``limit`` records (the same ones: the order is the files' order), not
    # the whole split (Fashion-MNIST's 60k: ~10 s against ~0.3 s for 2k).
    size = builder.info.splits[split].num_examples
    process_split = f"{split}[:{limit}]" if 0 < limit < size else split
    if jax.process_count() > 1:
        process_split = tfds.split_for_jax_process(process_split, drop_remainder=True)
    data = tfds.as_numpy(builder.as_dataset(split=process_split, batch_size=-1))
    images = np.asarray(data["image"], np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    return images, np.asarray(data["label"], np.int32)
