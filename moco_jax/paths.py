"""Paths that may be local or in an object store (``gs://bucket/...``): the place a path names,
and one clear line when a bucket cannot be reached.

``canonical`` is what two spellings of one place share (relative or absolute, a trailing slash,
a symbolic link), to tell "the same directory" from "another one".

Without network, credentials or the bucket, the file-system layer (TensorFlow's GCS file system
under ``etils.epath``, or TensorStore under orbax) raises its own errors: some are not
``OSError`` (a traceback), and their messages end in a tab-indented fragment (``when reading
metadata of gs://...``). The first touch of each such path a command makes goes through
``check_reachable``, before any data is loaded, so that the failure is one line naming the
bucket and what to check.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath

CHECKS = (
    "check the credentials (gcloud auth application-default login, or "
    "GOOGLE_APPLICATION_CREDENTIALS), the network, and that the bucket exists"
)


def is_remote(path: str | epath.Path) -> bool:
    """Whether ``path`` names an object store (``scheme://``) rather than a local file."""
    return "://" in str(path)


def absolute(path: Any) -> Any:
    """A local path made absolute (orbax reads checkpoints only by absolute paths); a bucket's
    path, None or an empty string as they are (validation names the empty one)."""
    if isinstance(path, str) and path.strip() and not is_remote(path):
        return os.path.abspath(path)
    return path


def canonical(path: str | epath.Path) -> str:
    """The place ``path`` names: a local path resolved (absolute, links followed, no trailing
    slash), a bucket's path without a trailing slash."""
    if is_remote(path):
        return str(path).rstrip("/")
    return os.path.realpath(os.fspath(path))


def is_within(path: str | epath.Path, directory: str | epath.Path) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it (both ``canonical``)."""
    path, directory = canonical(path), canonical(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def bucket_of(path: str | epath.Path) -> str:
    """``gs://bucket`` of ``gs://bucket/a/b``."""
    scheme, _, rest = str(path).partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _reason(err: BaseException) -> str:
    """The first line of what the file-system layer said (its later lines repeat the path)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def unreachable(
    what: str, path: str | epath.Path, err: BaseException, doing: str = "reach"
) -> OSError:
    """The one-line error for ``path`` (named as ``what``) whose bucket did not answer (or, with
    ``doing="write to"``, refused a write)."""
    return OSError(
        f"{what} {path}: cannot {doing} the bucket {bucket_of(path)} ({_reason(err)}); {CHECKS}"
    )


def check_reachable(what: str, path: str | epath.Path) -> None:
    """For a path in an object store, ask once whether it exists: ``unreachable`` if the bucket
    does not answer. Local paths are left to the caller (their errors are ``OSError`` already)."""
    if not is_remote(path):
        return
    try:
        epath.Path(path).exists()
    except Exception as err:  # each file-system layer raises its own kinds
        raise unreachable(what, path, err) from None
