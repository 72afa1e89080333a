"""Preparing TFDS datasets from local copies of their original files, with recorded checksums.

Machines without internet have Fashion-MNIST's four original files from the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). Debian recompressed the
``.gz`` files, so TFDS's registered checksums (of the upstream ``.gz``) do not match even though
the images are identical. We therefore check the SHA-256 of the *decompressed* IDX files, which
are the dataset's actual bytes, against values recorded here, and hand the verified files to
TFDS's own ``fashion_mnist`` builder; the prepared dataset is the regular ``fashion_mnist`` one.
TFDS's download checks stay on for every other dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import shutil
import urllib.parse

import tensorflow_datasets as tfds

FASHION_MNIST_DIR = pathlib.Path(
    os.environ.get("MOCO_JAX_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)

# SHA-256 of the decompressed upstream files (identical in Debian's recompressed copies).
FASHION_MNIST_CONTENT_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"


class LocalSourceError(RuntimeError):
    """A local source file is missing or its content is not what was recorded."""


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _VerifiedLocalFiles:
    """Stands in for TFDS's download manager: maps each URL to a verified local file."""

    def __init__(self, source_dir: pathlib.Path, checksums: dict[str, str], work_dir: pathlib.Path):
        self.source_dir, self.checksums, self.work_dir = source_dir, checksums, work_dir

    def download_and_extract(self, urls: dict[str, str]) -> dict[str, str]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return {key: self._extract(url) for key, url in urls.items()}

    def _extract(self, url: str) -> str:
        filename = pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name
        stem = filename.removesuffix(".gz")
        if stem not in self.checksums:
            raise LocalSourceError(f"no recorded checksum for {filename}")
        source = self.source_dir / filename
        if not source.exists():
            raise LocalSourceError(f"{source} is missing; install it with: {INSTALL_HINT}")
        target = self.work_dir / stem
        with gzip.open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        actual = _sha256(target)
        if actual != self.checksums[stem]:
            target.unlink()
            raise LocalSourceError(
                f"{source}: decompressed SHA-256 {actual} does not match the recorded "
                f"{self.checksums[stem]}; the file is damaged or not Fashion-MNIST"
            )
        return str(target)


class LocalFashionMNIST(tfds.image_classification.FashionMNIST, skip_registration=True):
    """TFDS's ``fashion_mnist`` builder reading the verified local files instead of the web."""

    name = "fashion_mnist"

    def _split_generators(self, dl_manager):  # TFDS's is replaced
        files = _VerifiedLocalFiles(
            FASHION_MNIST_DIR, FASHION_MNIST_CONTENT_SHA256, _extract_dir(self)
        )
        return super()._split_generators(files)


def _extract_dir(builder: tfds.core.DatasetBuilder) -> pathlib.Path:
    """Scratch space beside the dataset (``<data_dir>/<name>/<version>`` -> ``<data_dir>``)."""
    return pathlib.Path(builder.data_dir).parent.parent / f"{builder.name}_local_source"


def prepare_from_local(name: str, data_dir: str | None) -> bool:
    """Prepare ``name`` from verified local files; False when no local source exists."""
    if name != "fashion_mnist" or not FASHION_MNIST_DIR.exists():
        return False
    builder = LocalFashionMNIST(data_dir=data_dir)
    try:
        builder.download_and_prepare()
    finally:
        shutil.rmtree(_extract_dir(builder), ignore_errors=True)
    return True
