"""Where moco_jax reads and writes: paths that may be local or in a bucket, and regular files.

## Paths

Paths that may be local or in an object store (``gs://bucket/...``): the place a path names,
and one clear line when a bucket cannot be reached.

``canonical`` is what two spellings of one place share (relative or absolute, a trailing slash,
a symbolic link), to tell "the same directory" from "another one".

Without network, credentials or the bucket, the file-system layer (TensorFlow's GCS file system
under ``etils.epath``, or TensorStore under orbax) raises its own errors: some are not
``OSError`` (a traceback), and their messages end in a tab-indented fragment (``when reading
metadata of gs://...``). The first touch of each such path a command makes goes through
``check_reachable``, before any data is loaded, so that the failure is one line naming the
bucket and what to check.

## Regular files

Only regular files are read as inputs or replaced as outputs.

A path a user names (``--pretrained``, ``init_from``, ``--output``) or a file in a workdir may be
anything the file system holds. Reading a FIFO blocks for ever; reading ``/dev/zero`` fills memory
until the kernel kills the process; renaming a finished file over ``--output /dev/null`` (as root)
replaces the system's device. So:

- ``check_input``: before anything reads ``path``, it must be a regular file or a directory, and a
  file no larger than ``MAX_INPUT_BYTES`` nor than the memory available now (a weights file is
  read whole into memory); else one ``FileRefused`` naming it.
- ``check_output`` / ``write_whole``: an existing target that is not a regular file (a device,
  FIFO, socket, directory, or a symlink to one) is refused; the data goes to a temporary file
  beside the target, renamed over it once complete; a write that fails (full disk, read-only file
  system, permissions) removes the temporary file and raises ``WriteFailed`` naming the target and
  the cause, the target keeping what it had.

Paths on an object store (``gs://...``) hold objects only, each written whole: not checked.
"""

from __future__ import annotations

import os
import socket
import stat
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


def probe_writable(directory: epath.Path) -> None:
    """Write and remove a small file in ``directory`` (raises what the file system raises). The
    file is this process's own, named by host and pid: the processes of a pod run probe one
    shared directory at once, and a shared name let one remove the other's probe between its
    write and its unlink."""
    probe = directory / f".write_test_{socket.gethostname()}_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()


# Regular files

# Larger than any weights file or workdir file moco_jax reads (the official ViT-L MoCo v3
# checkpoint with its optimizer state is about 5 GiB), small enough to say "this is not one".
MAX_INPUT_BYTES = 32 * 2**30

_KINDS = [
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
]


class FileRefused(OSError):
    """A path that is not a regular file (or directory) where one is read, or is too large."""


class WriteFailed(OSError):
    """A write that did not complete; ``errno`` is the cause's (``ENOSPC``, ``EROFS``, ...)."""

    def __str__(self) -> str:
        return str(self.strerror)


def kind_of(mode: int) -> str:
    """``a directory``, ``a FIFO (named pipe)``, ... for an ``st_mode``; ``a regular file``."""
    return next((kind for is_kind, kind in _KINDS if is_kind(mode)), "a regular file")


def available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable`` of ``/proc/meminfo``), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_input(path: Any, what: str = "") -> None:
    """``FileRefused`` unless ``path`` (if it exists: a missing one is the reader's to report) is
    a directory or a regular file of at most ``MAX_INPUT_BYTES`` and the memory available.
    ``what`` names the setting in the message (``init_from``, ``linear.pretrained``)."""
    if is_remote(path):
        return
    try:
        info = os.stat(path)  # follows symlinks: the kind of what would be read
    except (FileNotFoundError, NotADirectoryError):
        return
    named = f"{what} {path}" if what else str(path)
    if stat.S_ISDIR(info.st_mode):
        return
    if not stat.S_ISREG(info.st_mode):
        raise FileRefused(
            f"{named} is {kind_of(info.st_mode)}, not a regular file: only a file or a "
            f"directory is read"
        )
    free = available_memory()
    limit, why = MAX_INPUT_BYTES, "the largest file read"
    if free is not None and free < limit:
        limit, why = free, "the memory available now"
    if info.st_size > limit:
        raise FileRefused(f"{named} is {_size(info.st_size)}, more than {why} ({_size(limit)})")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_output(path: Any, what: str = "") -> None:
    """``FileRefused`` if ``path`` exists and is not a regular file (a symlink is judged by what
    it points to): writing replaces the target, which must be a file."""
    if is_remote(path):
        return
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISREG(info.st_mode):
        named = f"{what} {path}" if what else str(path)
        raise FileRefused(
            f"{named} is {kind_of(info.st_mode)}, not a regular file: refusing to replace it; "
            f"name a new or regular file"
        )


def write_whole(path: Any, data: bytes | str, what: str = "") -> None:
    """``path`` holds all of ``data`` (text as UTF-8) or keeps what it had: written to
    ``.NAME.partial`` beside it, flushed to disk, renamed over it. ``FileRefused`` if ``path`` is
    not a regular file; ``WriteFailed`` naming ``path`` and the cause if the write fails."""
    data = data.encode() if isinstance(data, str) else data
    path = epath.Path(path)
    if is_remote(path):  # an object store writes each object whole
        path.write_bytes(data)
        return
    check_output(path, what)
    partial = os.path.join(os.fspath(path.parent), f".{path.name}.partial")
    created = False
    try:
        try:  # a killed write's leftover (unlink never follows a link nor opens a FIFO)
            os.unlink(partial)
        except FileNotFoundError:
            pass
        # O_EXCL: a new file, never one that appeared there meanwhile (nor a symlink's target).
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        created = False
    except OSError as err:
        named = f"{what} {path}" if what else str(path)
        cause = err.strerror or str(err)
        raise WriteFailed(err.errno, f"could not write {named}: {cause} (left as it was)") from err
    finally:
        if created:
            try:
                os.unlink(partial)
            except OSError:
                pass


def read_text(path: Any, what: str = "") -> str:
    """``path``'s text (UTF-8) once ``check_input`` has let it through."""
    check_input(path, what)
    return epath.Path(path).read_text(encoding="utf-8")


def read_bytes(path: Any, what: str = "") -> bytes:
    """``path``'s bytes once ``check_input`` has let it through."""
    check_input(path, what)
    return epath.Path(path).read_bytes()
