"""Only regular files are read or replaced (``moco_jax.storage``): an export's ``--output``
or a workdir file that is a FIFO, a symlink to ``/dev/null`` or a directory is refused and left
as it was; a write that fails (full disk) is one error naming the file, with no temporary file
left; ``--output`` inside the run's checkpoints is refused; weights named by ``init_from`` or
``linear.pretrained`` that are a FIFO, ``/dev/zero`` or larger than the limit are refused before
anything reads them (a FIFO blocks its reader for ever, ``/dev/zero`` fills memory).

A read that would block runs in a thread with a deadline, and the readers that would read
``/dev/zero`` whole are replaced by a failing stand-in: a regression fails the test instead of
hanging it or exhausting the machine's memory.
"""

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import threading

import pytest
from test_disk_full import small_disk  # noqa: F401 - the 3 MiB tmpfs fixture

from configs import linear_fashion_mnist
from moco_jax import export, storage
from moco_jax.config.checks import ConfigError
from moco_jax.interop import torch_files
from moco_jax.interop.init_from import load_encoder_weights
from moco_jax.run.linear_eval import with_pretrained
from moco_jax.run.metrics_io import MetricsWriter, read_records, write_atomically
from moco_jax.run.saved_run import load_run_config
from tests.test_export import _fresh, saved_run
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``(workdir, setup)`` of a tiny saved run (one checkpoint, nothing exported)."""
    workdir = tmp_path_factory.mktemp("run")
    setup, _, _ = saved_run(workdir, tiny_config(), ())
    return workdir, setup


def _fifo(path):
    os.mkfifo(path)
    return path


def _dev_null_link(path):
    os.symlink("/dev/null", path)
    return path


def _finishes(fn, *args, seconds=30):
    """``fn(*args)``'s exception (None if it returned), failing the test if it blocks."""
    outcome = {}

    def call():
        try:
            fn(*args)
            outcome["error"] = None
        except BaseException as err:  # handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{fn.__name__} blocked (reading a FIFO?)"
    return outcome["error"]


@pytest.fixture
def no_whole_reads(monkeypatch):
    """The readers that take a whole file fail instead: one reached means a special file was
    read (``/dev/zero`` would be read until memory runs out)."""

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"{path} was read")

    for name in ("load_torch_file", "load_pickle_file", "is_torch_file"):
        monkeypatch.setattr(torch_files, name, refuse)


# --- Export's --output. ---


@pytest.mark.parametrize("make", [_fifo, _dev_null_link], ids=["fifo", "link-to-dev-null"])
def test_export_refuses_an_output_that_is_not_a_regular_file(run, tmp_path, monkeypatch, make):
    workdir, _ = run
    output = make(tmp_path / "out.pkl")
    before = os.lstat(output)
    monkeypatch.setattr(export, "restore", lambda *a: pytest.fail("restored before refusing"))
    with pytest.raises(OSError, match=r"^--output .*out\.pkl is a (FIFO|character device).*not a"):
        export.export_weights(str(workdir), "detectron2", str(output))
    after = os.lstat(output)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert sorted(os.listdir(tmp_path)) == ["out.pkl"]  # no temporary file either


@pytest.mark.parametrize("where", ["checkpoints", "checkpoints_damaged", "checkpoints/6"])
def test_export_refuses_an_output_inside_the_checkpoints(run, tmp_path, where):
    workdir, _ = run
    os.symlink(workdir, tmp_path / "alias")  # a path reaching the workdir another way
    (workdir / where).mkdir(exist_ok=True, parents=True)
    for base in (workdir, tmp_path / "alias"):
        output = base / where / "x.pkl"
        with pytest.raises(ConfigError, match=r"is inside .*checkpoints.*write the export else"):
            export.export_weights(str(workdir), "detectron2", str(output))
        assert not output.exists()
    if where == "checkpoints_damaged":
        (workdir / where).rmdir()


def test_an_export_onto_a_full_disk_is_one_error_naming_the_output(run, small_disk):  # noqa: F811
    workdir, _ = run
    filler = small_disk / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(small_disk).free))
    output = small_disk / "model.pkl"
    with pytest.raises(storage.WriteFailed) as failed:
        export.export_weights(str(workdir), "detectron2", str(output))
    assert failed.value.errno == errno.ENOSPC
    assert str(failed.value) == (
        f"could not write --output {output}: No space left on device (left as it was)"
    )
    assert sorted(os.listdir(small_disk)) == ["filler"]  # no model.pkl, no .model.pkl.partial


def _export_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "moco_jax.export", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_export_cli_to_a_fifo_is_one_error_line_and_writes_nothing(run, tmp_path):
    workdir, _ = run
    output = _fifo(tmp_path / "out.pkl")
    result = _export_cli(f"--workdir={workdir}", "--format=detectron2", f"--output={output}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        f"error: --output {output} is a FIFO (named pipe), not a regular file: refusing to "
        f"replace it; name a new or regular file"
    )
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert "wrote" not in result.stdout and "Traceback" not in result.stderr
    assert stat.S_ISFIFO(os.lstat(output).st_mode)


# --- The workdir's own files (config.json, summary.json, records). ---


@pytest.mark.parametrize("make", [_fifo, _dev_null_link], ids=["fifo", "link-to-dev-null"])
def test_an_atomic_write_refuses_to_replace_what_is_not_a_regular_file(tmp_path, make):
    target = make(tmp_path / "summary.json")
    error = _finishes(write_atomically, target, "{}\n")
    assert isinstance(error, storage.FileRefused), error
    assert str(error).startswith(f"{target} is a ")
    assert os.lstat(target).st_mode == os.lstat(make(tmp_path / "again")).st_mode
    assert sorted(os.listdir(tmp_path)) == ["again", "summary.json"]


def test_an_atomic_write_onto_a_full_disk_leaves_no_temporary_file(small_disk):  # noqa: F811
    target = small_disk / "summary.json"
    target.write_text("old\n")
    (small_disk / "filler").write_bytes(bytes(shutil.disk_usage(small_disk).free))
    with pytest.raises(storage.WriteFailed, match=r"No space left on device") as failed:
        write_atomically(target, "new " * 100_000)
    assert failed.value.errno == errno.ENOSPC and str(target) in str(failed.value)
    assert target.read_text() == "old\n"
    assert sorted(os.listdir(small_disk)) == ["filler", "summary.json"]


def test_an_atomic_write_replaces_a_killed_writes_leftover(tmp_path):
    _fifo(tmp_path / ".config.json.partial")  # whatever is at the temporary name is ours
    assert _finishes(write_atomically, tmp_path / "config.json", "{}\n") is None
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


@pytest.mark.parametrize("name", ["config.json", "epochs.jsonl", "baselines.json"])
def test_a_workdir_file_that_is_a_fifo_is_refused_not_read(tmp_path, name):
    path = _fifo(tmp_path / name)
    reads = {
        "config.json": lambda: load_run_config(tmp_path),
        "epochs.jsonl": lambda: read_records(path, "epoch"),  # also what a resumed run rewinds
        "baselines.json": MetricsWriter(tmp_path, enabled=False).read_history,
    }[name]
    error = _finishes(reads)
    assert isinstance(error, storage.FileRefused), error
    assert str(error) == (
        f"{path} is a FIFO (named pipe), not a regular file: only a file or a directory is read"
    )


# --- Weights read by init_from and linear.pretrained. ---


@pytest.mark.parametrize("source", ["fifo", "dev-zero"])
def test_init_from_a_special_file_is_refused_before_reading(run, tmp_path, no_whole_reads, source):
    _, setup = run
    path = _fifo(tmp_path / "w.pth") if source == "fifo" else tmp_path / "zero.pth"
    if source == "dev-zero":
        os.symlink("/dev/zero", path)
    config = tiny_config(init_from=str(path))
    error = _finishes(load_encoder_weights, str(path), _fresh(setup), setup)
    assert isinstance(error, storage.FileRefused), error
    kind = "a FIFO (named pipe)" if source == "fifo" else "a character device"
    assert str(error) == f"{path} is {kind}, not a regular file: only a file or a directory is read"
    # And the config is refused up front, before a run makes its workdir.
    from moco_jax.config.validation import validate_config

    with pytest.raises(storage.FileRefused, match=re.escape(f"init_from {path} is {kind}")):
        validate_config(config, 1)


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
def test_linear_pretrained_a_special_file_is_refused(tmp_path, no_whole_reads, source):
    path = str(_fifo(tmp_path / "w.pth")) if source == "fifo" else source
    error = _finishes(with_pretrained, linear_fashion_mnist.get_config(), path)
    assert isinstance(error, storage.FileRefused), error
    assert str(error).startswith(f"linear.pretrained {path} is a ")


@pytest.mark.parametrize("limit", ["stated", "memory"])
def test_a_weights_file_larger_than_the_limit_is_refused(
    run, tmp_path, monkeypatch, no_whole_reads, limit
):
    _, setup = run
    path = tmp_path / "big.pth"
    with open(path, "wb") as sparse:
        sparse.truncate(3 * 2**20)
    if limit == "stated":
        monkeypatch.setattr(storage, "MAX_INPUT_BYTES", 2**20)
        why = r"the largest file read \(1\.0 MiB\)"
    else:
        monkeypatch.setattr(storage, "available_memory", lambda: 2**20)
        why = r"the memory available now \(1\.0 MiB\)"
    with pytest.raises(storage.FileRefused, match=f"big.pth is 3.0 MiB, more than {why}"):
        load_encoder_weights(str(path), _fresh(setup), setup)
    with pytest.raises(storage.FileRefused, match=f"^linear.pretrained {path} is 3.0 MiB"):
        with_pretrained(linear_fashion_mnist.get_config(), str(path))
