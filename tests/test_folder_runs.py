"""train.py on a folder of images with bad files: killed with SIGKILL and rerun, it ends bit for
bit equal to an uninterrupted run, with the skipped images counted in each epoch record; the
folder changed afterwards is refused; ``evaluate knn`` reads the folder run.

The MLP backbone at 16x16 on 2 of the 8 CPU devices (Shuffle-BN on): the folder input is the
point, and it compiles in a fraction of a ResNet's time.
"""

import json
import os
import pathlib
import shutil
import signal

import forkserver
import numpy as np
import pytest
from folder_fixtures import add_bad_files, write_image_folder
from test_resume import _checkpoint, _records
from xla_flags import cpu_devices

from tiny import set_fields

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6  # 2 epochs of 55 records (48 images + 7 bad files) in batches of 16: 3 steps each


def _run(folder, workdir, *extra, kill_at=None, wait=True, cwd=None):
    env = dict(os.environ, MOCO_JAX_NO_PROGRESS="1")
    env["XLA_FLAGS"] = cpu_devices(8)
    env.pop("MOCO_JAX_FAULT_KILL_AT_STEP", None)
    if kill_at:
        env["MOCO_JAX_FAULT_KILL_AT_STEP"] = str(kill_at)
    entry = [str(ROOT / "tests/with_faults.py")] if kill_at else []  # installs faults.py
    command = [
        *entry,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs/smoke.py"),
    ]
    command += [
        "--workdir", str(workdir), f"--config.dataset.name=folder:{folder}",
        "--config.dataset.num_channels=3", "--config.dataset.mean=(0.5, 0.5, 0.5)",
        "--config.dataset.std=(0.25, 0.25, 0.25)", "--config.num_devices=2",
        "--config.batch_size=16", "--config.moco.queue_size=32", "--config.model.backbone=mlp",
        "--config.model.width_multiplier=0.25", "--config.epochs=2", "--config.knn.k=5",
        "--config.checkpoint.every_steps=2", "--config.log_every_steps=1", *extra,
    ]  # fmt: skip
    process = forkserver.server().start(command, env=env, cwd=cwd)  # its imports done once
    return _finish(process) if wait else process


def _finish(process):
    return process.output()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two at a time: the reference beside the killed run, then ``evaluate knn`` of the reference
    (from another directory) beside the rerun of the killed one."""
    root = tmp_path_factory.mktemp("folder_runs")
    folder = write_image_folder(root / "images")
    add_bad_files(folder / "train" / "red")
    # The reference names its folder relative to its directory; evaluate knn, run from
    # elsewhere, still finds it (the run stores the absolute path).
    reference = _run("images", root / "reference", wait=False, cwd=root)
    killed = _run(folder, root / "interrupted", kill_at=4)
    reference = _finish(reference)
    knn = forkserver.server().start(
        ["-m", "moco_jax.evaluate", "knn", "--workdir", str(root / "reference")],
        env=dict(os.environ, XLA_FLAGS=cpu_devices(8)),
        cwd=ROOT,
    )
    finish = _run(folder, root / "interrupted")
    return {"root": root, "folder": folder, "reference": reference, "killed": killed,
            "finish": finish, "knn": _finish(knn)}  # fmt: skip


def test_a_killed_folder_run_resumes_bit_for_bit(runs):
    root = runs["root"]
    assert runs["killed"].returncode == -signal.SIGKILL
    for name in ("reference", "finish"):
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    arrays, meta = _checkpoint(root / "interrupted", STEPS)
    expected, expected_meta = _checkpoint(root / "reference", STEPS)
    assert arrays.keys() == expected.keys()
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)
    assert meta["fingerprint"] == expected_meta["fingerprint"]
    epochs = _records(root / "interrupted" / "epochs.jsonl", "epoch", drop="knn_seconds")
    assert epochs == _records(root / "reference" / "epochs.jsonl", "epoch", drop="knn_seconds")
    # The 7 bad files are skipped in every epoch, never a crash.
    assert [epochs[e]["skipped_images"] for e in (1, 2)] == [7, 14]


def test_evaluate_knn_reads_a_folder_run(runs):
    assert runs["knn"].returncode == 0, runs["knn"].stderr[-3000:]
    output = runs["root"] / "reference" / "knn_eval" / f"step_{STEPS}.json"
    result = json.loads(output.read_text())
    assert result["step"] == STEPS and result["knn_pixels"] > 90  # colour classes


def test_evaluate_show_draws_a_folder_run(runs):
    """``evaluate show`` of a streamed run: its centre crops, from the latest checkpoint."""
    from moco_jax.evaluate import show

    paths = show(str(runs["root"] / "reference"))
    show_dir = runs["root"] / "reference" / "show" / f"step_{STEPS}"
    assert [str(p) for p in paths] == [
        str(show_dir / n) for n in ("neighbours.png", "embedding.png")
    ]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_a_folder_changed_since_the_checkpoint_is_refused(runs):
    folder, workdir = runs["folder"], runs["root"] / "interrupted"
    blue = folder / "train" / "blue"
    shutil.copy(blue / "001.jpeg", blue / "copy.jpeg")
    result = _run(folder, workdir, "--config.epochs=3")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith(f"error: dataset folder {folder}/train"), last
    assert "changed since the checkpoint: 1 file(s) added, 0 removed (blue: 16 -> 17)" in last
    assert "Traceback" not in result.stderr


def test_evaluate_linear_caches_a_folders_features(runs, tmp_path):
    """The linear evaluation with ``cached_features`` on the folder run: the 48 good training
    images' features once, in the folder's order with their labels, the 7 bad files counted and
    their places in the epoch taken by the first images; the classifier learns the colours."""
    from moco_jax.config.defaults import linear_config
    from moco_jax.data.folder_source import FolderSource
    from moco_jax.run.linear_eval import backbone_unchanged, setup_linear_run, with_pretrained
    from moco_jax.run.trainer import train_loop

    folder = runs["folder"]
    config = linear_config()
    fields = {
        "dataset.name": f"folder:{folder}", "dataset.image_size": 16, "dataset.num_channels": 3,
        "dataset.mean": (0.5,) * 3, "dataset.std": (0.25,) * 3, "model.bn_mode": "sync",
        "num_devices": 2, "batch_size": 10, "linear.num_classes": 3, "linear.cached_features": True,
        "epochs": 4, "optim.lr_milestones": (3,), "checkpoint.every_steps": 0,
    }  # fmt: skip
    config = with_pretrained(set_fields(config, fields), str(runs["root"] / "reference"))
    run = setup_linear_run(config, tmp_path / "linear")
    try:
        views = run.train_views
        labels = np.asarray(views.train_set.labels)
        history, state = train_loop(run)
        unchanged = backbone_unchanged(run, state)
    finally:
        run.close()
    listed = list(FolderSource(str(folder)).records("train").as_numpy_iterator())
    bad = (b"", b"notes.jpg", b"truncated.jpg", b"empty.png", b"pixel.png", b"huge.png")
    good = [label for path, label in listed if path.rsplit(b"/", 1)[-1] not in bad]
    steps = len(listed) // 10  # 55 records (or 56, after the changed-folder test's copy)
    assert views.steps_per_epoch == steps and views.counters() == {"skipped_images": 7}
    # The good images read once; the first again to fill ``steps`` steps of 10.
    np.testing.assert_array_equal(labels, good + good[: steps * 10 - len(good)])
    assert views.train_set.images.shape[0] == steps * 10
    last = history["epochs"][-1]
    assert unchanged and last["skipped_images"] == 7
    assert last["test_top1"] > 90, last  # three colours
