"""A folder of images as a dataset: ``--config.dataset.name=folder:ROOT``.

The layout is torchvision's ``ImageFolder``, the one the official MoCo reads ImageNet from:
``ROOT/<split>/<class>/<image>``, with the splits ``train`` and, for evaluation, ``val`` (read as
TFDS's ``validation``) or ``test``. Labels are the indices of the sorted class names of
``train``. Images are whatever TensorFlow decodes (JPEG, PNG, GIF, BMP); they are streamed
through the host-crop path (``streaming.py``): a record is a file's path, read and decoded inside
the tf.data map that crops it, so a JPEG is decoded only inside its crop windows and a bad file
fails there, where it is skipped and counted.

A ``FolderSource`` stands in for a TFDS builder where moco_jax reads one (``info.splits``,
``info.features["label"]``, ``records``). Written here rather than taken from
``tfds.folder_dataset.ImageFolder``: that builder lists through ``tf.io.gfile.listdir``, which
raises on a file name that is not UTF-8 (one such file would stop the run), reads only
``.jpg/.jpeg/.png``, does not report layout mistakes, and reads each file in its own map before
the epoch's shuffle (resuming would read every skipped file again).

The file order is a function of the file list only: sorted names, then one fixed permutation
(class-sorted order would leave the epoch's shuffle buffer a few classes at a time), then each
process takes its contiguous share (as ``tfds.split_for_jax_process``). So the data order stays
a function of the step, and a changed folder is refused on resume (``check_unchanged``).
"""

from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import numpy as np
from absl import logging

from moco_jax import storage
from moco_jax.data.tfds_source import DatasetError

FOLDER_PREFIX = "folder:"
# Directory name -> split name (TFDS's, so that "validation, else test" picks the same way).
SPLIT_DIRS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
LAYOUT = "ROOT/<split>/<class>/<image>"
FILE_ORDER_SEED = 20_200_313  # the fixed permutation of a split's sorted files
# The checkpoint's ``extra`` keys of the training split's fingerprint.
COUNTS_KEY, DIGEST_KEY = "folder_train_counts", "folder_train_digest"


def is_folder(name: str) -> bool:
    return isinstance(name, str) and name.startswith(FOLDER_PREFIX)


def folder_root(name: str) -> str:
    return name[len(FOLDER_PREFIX) :]


def absolute_name(name: str) -> str:
    """``folder:ROOT`` with a local ROOT made absolute (a saved run's config names the same folder
    from any directory, e.g. for ``evaluate knn``); any other name as it is."""
    return FOLDER_PREFIX + storage.absolute(folder_root(name)) if is_folder(name) else name


def _show(name: bytes | str) -> str:
    """A path or name for a message (bytes that are not UTF-8 shown escaped)."""
    return name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name


def _join(directory: bytes, name: bytes) -> bytes:
    return directory.rstrip(b"/") + b"/" + name


DIR, FILE, OTHER = "directory", "regular file", "other"  # what ``_entries`` says an entry is


def _entries(directory: bytes) -> list[tuple[bytes, str]]:
    """``(name, kind)`` of ``directory``'s entries (``DIR``, ``FILE``, or ``OTHER``: a FIFO,
    socket, device, or a symbolic link that loops or dangles), hidden ones (``.DS_Store``)
    left out, sorted by name. Names are bytes: a local name that is not UTF-8 is listed, not
    fatal. A symbolic link is followed."""
    if storage.is_remote(_show(directory)):  # bucket names are UTF-8
        import tensorflow as tf

        try:
            names = [n.rstrip("/") for n in tf.io.gfile.listdir(_show(directory))]
            found = [
                (n.encode(), DIR if tf.io.gfile.isdir(f"{_show(directory)}/{n}") else FILE)
                for n in names
            ]  # a bucket holds objects and prefixes only
        except tf.errors.OpError as err:  # not found, no permission, unreachable
            raise OSError(err.message) from None
    else:
        with os.scandir(directory) as listing:
            found = [(entry.name, _kind(entry)) for entry in listing]
    return sorted((name, kind) for name, kind in found if not name.startswith(b"."))


def _kind(entry: os.DirEntry) -> str:
    try:
        return DIR if entry.is_dir() else FILE if entry.is_file() else OTHER
    except OSError:  # a symbolic-link loop
        return OTHER


def _unreadable(what: str, err: OSError) -> DatasetError:
    return DatasetError(f"{what} cannot be read: {err.strerror or err}")


def _list_root(root: bytes) -> list[tuple[bytes, bool]]:
    shown = _show(root)
    if not storage.is_remote(shown) and not os.path.exists(root):
        raise DatasetError(f"dataset folder {shown} does not exist (layout {LAYOUT})")
    if not storage.is_remote(shown) and not os.path.isdir(root):
        raise DatasetError(f"dataset folder {shown} is not a directory (layout {LAYOUT})")
    try:
        return _entries(root)
    except OSError as err:
        raise _unreadable(f"dataset folder {shown}", err) from None


def _split_dirs(root: bytes) -> dict[str, bytes]:
    """Split name -> its directory; ``train`` must be there."""
    splits: dict[str, bytes] = {}
    for name, kind in _list_root(root):
        split = SPLIT_DIRS.get(_show(name))
        if split is None or kind != DIR:
            continue  # other files and folders beside the splits (a README, a labels file)
        if split in splits:
            raise DatasetError(
                f"dataset folder {_show(root)} has both val/ and validation/: keep one"
            )
        splits[split] = _join(root, name)
    if "train" not in splits:
        raise DatasetError(
            f"dataset folder {_show(root)} has no train/ directory (layout {LAYOUT}; val/ or "
            f"test/ beside it for evaluation)"
        )
    return splits


def _list_split(split_dir: bytes) -> dict[bytes, list[bytes]]:
    """Class name -> its files' paths, sorted; one ``DatasetError`` per layout mistake."""
    shown = _show(split_dir)
    try:
        entries = _entries(split_dir)
    except OSError as err:
        raise _unreadable(shown, err) from None
    files = [name for name, kind in entries if kind != DIR]
    if files:
        raise DatasetError(
            f"{_show(_join(split_dir, files[0]))} is a file where class directories belong "
            f"(layout {LAYOUT})"
        )
    if not entries:
        raise DatasetError(f"{shown} is empty: no class directories (layout {LAYOUT})")
    classes = {}
    for name, _ in entries:
        class_dir = _join(split_dir, name)
        try:
            inside = _entries(class_dir)
        except OSError as err:
            raise _unreadable(_show(class_dir), err) from None
        nested = [n for n, kind in inside if kind == DIR]
        if nested:
            raise DatasetError(
                f"{_show(_join(class_dir, nested[0]))} is a directory inside a class directory: "
                f"images sit directly in ROOT/<split>/<class>/"
            )
        if not inside:
            raise DatasetError(f"class directory {_show(class_dir)} holds no images")
        # Not a regular file (a FIFO would block its reader for ever, a device never end): b"",
        # a path that fails to read, so the file is skipped and counted like a corrupt one.
        classes[name] = [_join(class_dir, n) if kind == FILE else b"" for n, kind in inside]
    return classes


def _readable_name(path: bytes) -> bytes:
    """``path``, or b"" (no file: it fails to read, so it is skipped and counted) when its
    name is not UTF-8 (such a name cannot be shown in a log, a record or another tool) or it is
    no regular file (listed as b"")."""
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return b""
    return path


class FolderSource:
    """A folder in place of a TFDS builder: ``info.splits[s].num_examples``,
    ``info.features["label"]`` (``num_classes``, ``names``) and ``records(split)``."""

    holds_paths = True  # records carry file paths: the streamed path reads them in its map

    def __init__(self, root: str):
        self.root = root.rstrip("/") or "/"
        self.data_dir_root = self.root
        split_dirs = _split_dirs(os.fsencode(self.root))
        listed = {split: _list_split(path) for split, path in split_dirs.items()}
        class_names = sorted(listed["train"])
        for split, classes in listed.items():
            unknown = sorted(set(classes) - set(class_names))
            if unknown:
                raise DatasetError(
                    f"{_show(_join(split_dirs[split], unknown[0]))} is not a class of "
                    f"{_show(split_dirs['train'])} (labels are train's sorted class names)"
                )
        index = {name: i for i, name in enumerate(class_names)}
        self.class_counts = {
            split: {_show(name): len(files) for name, files in classes.items()}
            for split, classes in listed.items()
        }
        self._files = {
            split: _in_file_order(
                [(path, index[name]) for name, files in classes.items() for path in files]
            )
            for split, classes in listed.items()
        }
        self._digest = hashlib.sha256(b"\n".join(sorted(p for p, _ in self._files["train"])))
        special = sum(1 for p, _ in self._files["train"] if not p)
        if special:
            logging.warning(
                "%d entries of %s/train are no regular files (FIFOs, sockets, devices, broken "
                "links); they are skipped", special, self.root,
            )  # fmt: skip
        unreadable = [p for p, _ in self._files["train"] if p and not _readable_name(p)]
        if unreadable:
            logging.warning(
                "%d file name(s) in %s are not UTF-8; those files are skipped (e.g. %s)",
                len(unreadable), self.root, _show(unreadable[0]),
            )  # fmt: skip
        names = [_show(name) for name in class_names]
        label = SimpleNamespace(num_classes=len(names), names=names)
        splits = {s: SimpleNamespace(num_examples=len(f)) for s, f in self._files.items()}
        self.info = SimpleNamespace(splits=splits, features={"label": label})

    def records(self, split: str, process_index: int = 0, process_count: int = 1):
        """This process's ``(path, label)`` records of ``split`` (an even, contiguous share of
        the fixed file order; the remainder is dropped, as ``tfds.split_for_jax_process``)."""
        import tensorflow as tf

        files = self._files[split]
        share = len(files) // process_count if process_count > 1 else len(files)
        mine = files[process_index * share : (process_index + 1) * share]
        paths = tf.constant([_readable_name(p) for p, _ in mine], tf.string)
        labels = tf.constant([label for _, label in mine], tf.int32)
        return tf.data.Dataset.from_tensor_slices((paths, labels))

    def fingerprint(self) -> dict:
        """What a checkpoint keeps of the training split: files per class, and a digest of the
        file names (so a changed folder is refused on resume)."""
        return {COUNTS_KEY: dict(self.class_counts["train"]), DIGEST_KEY: self._digest.hexdigest()}

    def check_unchanged(self, extra: dict) -> None:
        """``DatasetError`` naming how many files were added and removed since the checkpoint
        whose ``extra`` this is (nothing to check in one from before folders were read)."""
        saved, digest = extra.get(COUNTS_KEY), extra.get(DIGEST_KEY)
        if saved is None or digest == self._digest.hexdigest():
            return
        now = self.class_counts["train"]
        added = sum(max(0, now.get(c, 0) - saved.get(c, 0)) for c in set(now) | set(saved))
        removed = sum(max(0, saved.get(c, 0) - now.get(c, 0)) for c in set(now) | set(saved))
        changed = sorted(c for c in set(now) | set(saved) if now.get(c, 0) != saved.get(c, 0))
        detail = ", ".join(f"{c}: {saved.get(c, 0)} -> {now.get(c, 0)}" for c in changed[:3])
        what = (
            f"{added} file(s) added, {removed} removed ({detail}{', ...' if changed[3:] else ''})"
            if changed
            else "as many files per class but other names"
        )
        raise DatasetError(
            f"dataset folder {self.root}/train changed since the checkpoint: {what}. A resumed "
            f"run needs the same files (its data order is a function of the file list): put "
            f"them back, or start another --workdir (--config.init_from takes this run's encoder)"
        )


def _in_file_order(files: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
    """Sorted by path, then one fixed permutation (a function of the file list only)."""
    files = sorted(files)
    order = np.random.default_rng(FILE_ORDER_SEED).permutation(len(files))
    return [files[i] for i in order]
