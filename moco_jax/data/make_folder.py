"""Write Fashion-MNIST as a folder of JPEGs, to try ``folder:`` datasets on real images offline.

    python -m moco_jax.data.make_folder --out /tmp/fmnist_folder --size 64 --rgb --per_class 600

reads the four original files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) and writes ``OUT/train/<class>/<index>.jpg`` and
``OUT/val/<class>/<index>.jpg`` (the 10k test images), each resized to ``--size`` px
(bilinear) and, with ``--rgb``, stored as three channels. Class directories are named
``0_tshirt_top`` ... ``9_ankle_boot`` so that the sorted names give Fashion-MNIST's own labels.
Then ``train.py --config.dataset.name=folder:OUT`` trains on them (docs/own_images.md).
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib
import sys

import numpy as np

from moco_jax.data import local_sources

CLASS_DIRS = (
    "0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
)  # fmt: skip
SPLITS = {"train": "train", "val": "t10k"}  # folder split <- file prefix


def read_idx(source: pathlib.Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, 28, 28]`` uint8 and labels ``[n]`` of one split's two IDX files."""
    with gzip.open(source / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(source / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each class (all with 0), in file order."""
    if not per_class:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return np.sort(keep)


def write_split(out: pathlib.Path, split: str, images, labels, size: int, rgb: bool) -> int:
    import tensorflow as tf

    for name in CLASS_DIRS:
        (out / split / name).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(images), 1000):  # resized a thousand at a time
        batch = tf.image.resize(images[start : start + 1000, ..., None], [size, size], "bilinear")
        batch = tf.cast(tf.clip_by_value(tf.round(batch), 0, 255), tf.uint8)
        batch = tf.image.grayscale_to_rgb(batch) if rgb else batch
        for offset, image in enumerate(batch):
            index = start + offset
            path = out / split / CLASS_DIRS[labels[index]] / f"{index:05d}.jpg"
            path.write_bytes(tf.io.encode_jpeg(image, quality=95).numpy())
    return len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder to write (ROOT of folder:ROOT)")
    parser.add_argument("--size", type=int, default=64, help="side of the written images, px")
    parser.add_argument("--rgb", action="store_true", help="three channels (default: grayscale)")
    parser.add_argument("--per_class", type=int, default=0, help="train images per class (0: all)")
    parser.add_argument("--val_per_class", type=int, default=0, help="val images per class")
    args = parser.parse_args(argv)
    source, out = local_sources.FASHION_MNIST_DIR, pathlib.Path(args.out)
    if not (source / "train-images-idx3-ubyte.gz").exists():
        return _fail(f"{source} has no Fashion-MNIST files: {local_sources.INSTALL_HINT}")
    if args.size < 8 or args.per_class < 0 or args.val_per_class < 0:
        return _fail("--size must be at least 8 and --per_class, --val_per_class at least 0")
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} exists and is not a directory: give a new folder's path")
    if out.exists() and any(out.iterdir()):
        return _fail(f"{out} exists and is not empty: write into a new folder")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for split, prefix in SPLITS.items():
        images, labels = read_idx(source, prefix)
        keep = first_per_class(labels, args.per_class if split == "train" else args.val_per_class)
        try:
            count = write_split(out, split, images[keep], labels[keep], args.size, args.rgb)
        except OSError as err:  # no permission, a full disk, a path through a file
            return _fail(f"could not write {out}: {err.strerror or err} (remove what was written)")
        print(f"{out / split}: {count} images in {len(CLASS_DIRS)} classes")
    print(f"train on it with --config.dataset.name=folder:{out.resolve()}")
    return 0


def _fail(message: str) -> int:
    """One ``error:`` line, exit code 2 (as ``moco_jax.run.cli_errors``, which data may not
    import)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
