"""Bad input on the command line (train.py, ``python -m moco_jax.evaluate``): exit code 2 and one
``error:`` line naming what is wrong, as the last line of stderr, with no traceback; and nothing
lost or made (nothing written into the current directory, no workdir, no checkpoint directory).

Each row runs one process that fails before anything is compiled or any data is loaded (but the
``init_from`` row, whose error comes after the run's checkpoint manager exists); they run two at a
time. Most are forks of a process that imported the programs once (tests/forkserver.py: 0.3 s a
row instead of ~10 s); the rows of ``FRESH_ROWS`` and ``--help`` start a fresh python, so what a
program prints while it imports (TensorFlow's and libtpu's banners) is seen too.
"""

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import forkserver
import pytest
from data_fixtures import fashion_mnist_data_dir
from xla_flags import cpu_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [str(ROOT / "train.py")]
SMOKE = ["--config", str(ROOT / "configs" / "smoke.py")]
EVALUATE = ["-m", "moco_jax.evaluate"]
LINEAR = ["--config", str(ROOT / "configs" / "linear_fashion_mnist.py")]
SLOW_ROWS = ("init-from-missing", "unknown-dataset", "image-too-large-for-memory", "bucket-workdir")
# Run as a user runs them, JAX choosing its platforms (with libtpu installed, as the test
# requirements install it, it looks for a TPU): still nothing on stderr but the error line.
ANY_PLATFORM_ROWS = ("image-too-large-for-memory",)
# A fresh python for these (the others are forks): JAX choosing its platforms, and TensorFlow
# imported by the run itself for its bucket client (which hangs in a fork of a process that
# imported TensorFlow).
BUCKET_ROWS = ("bucket-workdir", "bucket-init-from", "evaluate-bucket-workdir")
FRESH_ROWS = (*ANY_PLATFORM_ROWS, *BUCKET_ROWS, "linear-bucket-pretrained")
CLUSTER_PREFIXES = ("JAX_COORDINATOR", "SLURM_", "OMPI_", "TPU_WORKER", "KUBERNETES_")
BUCKET = "gs://moco-jax-test-no-such-bucket"
# A bucket is reached through this proxy, which is not there: "cannot reach" on any machine, at
# once (no retries, no look-up of the GCE metadata server).
NO_NETWORK = {"GCS_RETRY_CONFIG_MAX_RETRIES": "0", "NO_GCE_CHECK": "true"} | {
    name: "http://127.0.0.1:9"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
}

CONFIG_FILES = {
    "syntax.py": "def get_config(:\n    return 1\n",
    "dict.py": "def get_config():\n    return {'batch_size': 64}\n",
    "none.py": "def get_config():\n    pass\n",
}

# What is left as it was: "no workdir" (not even created), "no checkpoints" (the workdir has no
# checkpoint directory and no lock: nothing was set up), "no data" (the dataset was not loaded).
ROWS = [
    (
        "unknown-field",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.nonexistent=1"],
        "error: no config field 'nonexistent'",
        "no workdir",
    ),
    (
        "unknown-nested-field",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.model.nonexistent=1"],
        "error: no config field 'model.nonexistent'",
        "no workdir",
    ),
    (
        "bad-literal",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.batch_size=abc"],
        "error: flag --config.batch_size=abc: invalid literal for int()",
        "no workdir",
    ),
    (
        "unknown-dataset",  # was test_train.test_bad_input_on_the_command_line_is_one_clear_line
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.dataset.name=fashoin_mnist"],
        "error: unknown dataset 'fashoin_mnist'",
        "no workdir",
    ),
    (
        "missing-config-file",
        [*TRAIN, "--config", "{t}/missing.py", "--workdir", "{w}"],
        "error: --config {t}/missing.py: no such file",
        "no workdir",
    ),
    (
        "config-syntax-error",
        [*TRAIN, "--config", "{t}/syntax.py", "--workdir", "{w}"],
        "error: --config {t}/syntax.py: syntax error (line 1)",
        "no workdir",
    ),
    (
        "config-returns-dict",
        [*TRAIN, "--config", "{t}/dict.py", "--workdir", "{w}"],
        "error: --config {t}/dict.py: get_config() returned dict, not an ml_collections.ConfigDict",
        "no workdir",
    ),
    (
        "config-returns-none",
        [*TRAIN, "--config", "{t}/none.py", "--workdir", "{w}"],
        "error: --config {t}/none.py: get_config() returned NoneType, not an ml_collections",
        "no workdir",
    ),
    ("empty-workdir", [*TRAIN, *SMOKE, "--workdir", ""], "error: --workdir is empty", None),
    ("no-workdir", [*TRAIN, *SMOKE], "error: --workdir is required", None),
    ("no-config", [*TRAIN, "--workdir", "{w}"], "error: --config is required", "no workdir"),
    (
        "stray-argument",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "extra"],
        "error: unexpected argument 'extra'",
        "no workdir",
    ),
    (
        "distributed-without-cluster",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--distributed=on"],
        "error: --distributed=on but no cluster was found",
        "no workdir",
    ),
    # Config values that used to fail late, deep in a library, or by running out of memory.
    (
        "seed-out-of-range",
        [*TRAIN, *SMOKE, "--workdir", "{w}", f"--config.seed={2**70}"],
        "error: seed must be < 2**31, got 1180591620717411303424",
        "no workdir",
    ),
    (
        "dataset-name-is-a-path",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.dataset.name=../../etc/passwd"],
        "error: dataset.name must be a TFDS dataset name, got '../../etc/passwd'",
        "no workdir",
    ),
    (
        "folder-missing",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.dataset.name=folder:{t}/no_such_folder"],
        "error: dataset folder {t}/no_such_folder does not exist (layout ROOT/<split>/<class>/",
        "no workdir",
    ),
    (
        "init-from-a-file",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.init_from=/etc/passwd"],
        "error: init_from must be another run's workdir, checkpoints directory or step directory",
        "no workdir",
    ),
    (
        "init-from-a-fifo",  # was read by its loader, which blocked for ever
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.init_from={t}/fifo.pth"],
        "error: init_from {t}/fifo.pth is a FIFO (named pipe), not a regular file",
        "no workdir",
    ),
    (
        "linear-pretrained-a-fifo",
        [*EVALUATE, "linear", *LINEAR, "--workdir", "{w}", "--pretrained", "{t}/fifo.pth"],
        "error: linear.pretrained {t}/fifo.pth is a FIFO (named pipe), not a regular file",
        "no workdir",
    ),
    (
        "image-too-large-for-memory",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.dataset.image_size=100000"],
        "error: the run needs at least 4.77e+03 GiB per device (state",
        "no workdir",
    ),
    (
        "queue-too-large-for-memory",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.moco.queue_size=1000000000000"],
        "error: the run needs at least 4.77e+05 GiB per device (state",
        "no workdir",
    ),
    (
        "init-from-missing",  # raised after the Checkpointer exists: orbax must print nothing
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.init_from=/nonexistent"]
        + ["--config.dataset.data_dir={data}"],
        "error: init_from: /nonexistent does not exist",
        None,
    ),
    (
        "evaluate-no-checkpoint",
        [*EVALUATE, "knn", "--workdir", "{t}/run"],
        "error: no checkpoint in {t}/run/checkpoints",
        "no checkpoints, no data",
    ),
    (
        "evaluate-truncated-config",
        [*EVALUATE, "knn", "--workdir", "{t}/truncated"],
        "error: {t}/truncated/config.json is not valid JSON",
        "no checkpoints, no data",
    ),
    (
        "evaluate-not-a-moco-config",
        [*EVALUATE, "knn", "--workdir", "{t}/other"],
        "error: {t}/other/config.json is not a moco_jax config (no dataset, model",
        "no checkpoints, no data",
    ),
    (
        "evaluate-distributed-without-cluster",
        [*EVALUATE, "linear", *LINEAR, "--workdir", "{w}", "--distributed=on"],
        "error: --distributed=on but no cluster was found",
        "no workdir",
    ),
    (
        "evaluate-no-workdir",
        [*EVALUATE, "knn", "--workdir", "{w}"],
        "error: workdir {w} does not exist",
        "no workdir",
    ),
    (
        "evaluate-no-command",
        [*EVALUATE, "--workdir", "{t}/run"],
        "error: expected the command knn or linear",
        "no checkpoints, no data",
    ),
    (
        "linear-no-config",
        [*EVALUATE, "linear", "--workdir", "{w}"],
        "error: linear needs --config",
        "no workdir",
    ),
    # A bucket that cannot be reached (tests: an unreachable proxy, whatever the network).
    (
        "bucket-workdir",
        [*TRAIN, *SMOKE, "--workdir", f"{BUCKET}/run"],
        f"error: workdir {BUCKET}/run: cannot reach the bucket {BUCKET} (",
        None,
    ),
    (
        "bucket-init-from",
        [*TRAIN, *SMOKE, "--workdir", "{w}", f"--config.init_from={BUCKET}/run"],
        f"error: init_from {BUCKET}/run: cannot reach the bucket {BUCKET} (",
        "no workdir",
    ),
    (
        "evaluate-bucket-workdir",
        [*EVALUATE, "knn", "--workdir", f"{BUCKET}/run"],
        f"error: workdir {BUCKET}/run: cannot reach the bucket {BUCKET} (",
        None,
    ),
    (
        "linear-bucket-pretrained",
        [*EVALUATE, "linear", *LINEAR, "--workdir", "{w}", "--pretrained", f"{BUCKET}/run"],
        f"error: linear.pretrained {BUCKET}/run: cannot reach the bucket {BUCKET} (",
        "no workdir",
    ),
    # Shapes the backbone cannot use (shape_rules), before anything is built.
    (
        "image-size-1",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.dataset.image_size=1"],
        "error: dataset.image_size 1 is too small for resnet18 with the CIFAR stem: it "
        "downsamples 8x, so the smallest size it accepts is 8",
        "no workdir",
    ),
    (
        "vit-patch-does-not-divide",
        [*TRAIN, *SMOKE, "--workdir", "{w}", "--config.model.backbone=vit_test"]
        + ["--config.dataset.image_size=18"],
        "error: dataset.image_size 18 is not divisible by the patch size 4 of model.backbone "
        "vit_test",
        "no workdir",
    ),
    (
        "linear-workdir-is-pretrained",  # refused before its lock is written there
        [*EVALUATE, "linear", *LINEAR, "--workdir", "{t}/run/", "--pretrained", "{t}/run"],
        "error: --workdir {t}/run/ is the pretraining workdir of --pretrained {t}/run: the "
        "linear evaluation writes its own checkpoints and records",
        "no checkpoints, no data",
    ),
    (
        "linear-pretrained-missing",
        [*EVALUATE, "linear", *LINEAR, "--workdir", "{w}", "--pretrained", "/nonexistent"],
        "error: linear.pretrained: /nonexistent does not exist",
        "no workdir",
    ),
]


def _prepare(tmp_path: pathlib.Path) -> None:
    """Bad config files, a FIFO, and workdirs with a config.json (whose data directory must stay
    absent: a run that loaded the data first would prepare the dataset there)."""
    for name, text in CONFIG_FILES.items():
        (tmp_path / name).write_text(text)
    from configs.smoke import get_config

    config = get_config()
    config.dataset.data_dir = str(tmp_path / "data")
    saved = config.to_json_best_effort(indent=2)
    for name, text in [
        ("run", saved),
        ("truncated", saved[: len(saved) // 2]),
        ("other", json.dumps({"lr": 0.1})),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    os.mkfifo(tmp_path / "fifo.pth")  # weights that would block their reader
    (tmp_path / "cwd").mkdir()


def _run(
    args: list[str], cwd: pathlib.Path, any_platform: bool = False, fresh: bool = True
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
    env.update(MOCO_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    if any_platform:
        del env["JAX_PLATFORMS"]
    env["XLA_FLAGS"] = cpu_devices(1)
    if any(BUCKET in arg for arg in args):
        env.update(NO_NETWORK)
    if not fresh:
        return forkserver.server().run(args, env=env, cwd=cwd, timeout=300)
    command = [sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every row's subprocess, two at a time, the slow ones (which load data or TFDS) first:
    ``{row id: (its tmp dir, its placeholders, the finished process or a skip)}``."""
    runs = {}
    for row_id, args, _, _ in ROWS:
        tmp_path = tmp_path_factory.mktemp(row_id)
        _prepare(tmp_path)
        places = {"t": tmp_path, "w": tmp_path / "new_workdir"}
        if any("{data}" in arg for arg in args):
            try:
                places["data"] = fashion_mnist_data_dir()
            except pytest.skip.Exception as skip:
                runs[row_id] = (tmp_path, places, skip)
                continue
        runs[row_id] = (tmp_path, places, [arg.format(**places) for arg in args])
    forkserver.server()  # its imports before the rows' clocks start
    slow_first = sorted(runs, key=lambda row_id: row_id not in SLOW_ROWS)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = {
            row_id: pool.submit(
                _run,
                runs[row_id][2],
                runs[row_id][0] / "cwd",
                row_id in ANY_PLATFORM_ROWS,
                row_id in FRESH_ROWS,
            )
            for row_id in slow_first
            if isinstance(runs[row_id][2], list)
        }
        for row_id, future in started.items():
            runs[row_id] = (*runs[row_id][:2], future.result())
    return runs


@pytest.mark.parametrize(
    "row_id, error, untouched", [(r[0], *r[2:]) for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_bad_input_is_one_error_line(outcomes, row_id, error, untouched):
    tmp_path, places, result = outcomes[row_id]
    if isinstance(result, pytest.skip.Exception):
        raise result

    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(error.format(**places)), result.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert len(lines) == 1, result.stderr[-3000:]  # no banner or warning before it
    assert "Traceback" not in result.stderr
    assert not any((tmp_path / "cwd").iterdir())  # nothing written into the current directory
    if untouched and "no workdir" in untouched:
        assert not places["w"].exists()
    if untouched and "no checkpoints" in untouched:
        for workdir in ("run", "truncated", "other"):
            assert [p.name for p in (tmp_path / workdir).iterdir()] == ["config.json"]
    if untouched and "no data" in untouched:
        assert not (tmp_path / "data").exists()


def test_the_error_stays_the_last_line_after_a_checkpoint_manager_closed(tmp_path):
    """orbax's ``CheckpointManager.close()`` leaves the clean-up of temporary directories that
    opening it started running; at exit that thread logs a traceback after the ``error:`` line
    (a run failing right after ``setup_run`` made its Checkpointer) unless the exit waits."""
    script = (
        "from configs.smoke import get_config\n"
        "from moco_jax.run.checkpointing import Checkpointer\n"
        "from moco_jax.run.cli_errors import fail\n"
        f"Checkpointer({str(tmp_path / 'checkpoints')!r}, get_config()).close()\n"
        "fail('the last line')\n"
    )
    result = _run(["-c", script], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: the last line", result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [TRAIN, EVALUATE], ids=["train.py", "evaluate"])
def test_help_lists_every_flag_in_plain_text(command, tmp_path):
    """``--help`` (absl's stops before any JAX work) lists the command's own flags, --config and
    --distributed among them, without reStructuredText markup or a file path as a title."""
    result = _run([*command, "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--config:", "--distributed:", "--workdir:"):
        assert f"\n  {flag}" in result.stdout, result.stdout
    assert "``" not in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.endswith(".py:")]
