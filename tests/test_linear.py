"""Linear evaluation (the official ``main_lincls.py`` protocol) and fine-tuning.

The step: only the classifier trains, every other array (backbone weights, BN statistics) stays
bit-equal; fine-tuning moves both. The lr schedule of the protocol. A run on real Fashion-MNIST,
from a tiny pretraining workdir, through ``python -m moco_jax.evaluate linear``: SIGKILLed
mid-epoch and resumed, it ends equal to an uninterrupted one (state, records, summary); the
summary, plot and sanity check are there. ``cached_features`` agrees with an independent
scikit-learn logistic regression on the same features.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fixtures import fashion_mnist_data_dir
from workdirs import assert_same_final_state, records
from xla_flags import cpu_devices

import moco_jax
from configs import linear_fashion_mnist
from moco_jax.config.checks import ConfigError
from moco_jax.config.defaults import linear_config
from moco_jax.mesh import shard_batch
from tiny import set_fields, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Fashion-MNIST at 28x28 with the MLP backbone: traces and compiles in a fraction of a ResNet.
# Flips only: the random-resized crop (the pretraining views' own, test_augment's) compiles for
# seconds, and a flip is as random for the resume to repeat.
SMALL = {
    "augment.crop": False,
    "dataset.max_train_examples": 512,
    "dataset.max_test_examples": 256,
    "batch_size": 64,
    "checkpoint.every_steps": 3,
    "log_every_steps": 1,
}
EPOCHS, STEPS_PER_EPOCH = 2, 8


def _linear_tiny(**overrides):
    """The smoke data (16x16) and the MLP backbone (Dense, BatchNorm, ReLU: compiles in a
    fraction of a ResNet's time) under the linear protocol."""
    config = linear_config()
    smoke = tiny_config()
    config.dataset, config.model = smoke.dataset, smoke.model
    config.model.backbone, config.model.bn_mode = "mlp", "sync"
    config.batch_size, config.linear.num_classes = 16, 10
    return set_fields(config, overrides)


def _step_inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    size, channels = config.dataset.image_size, config.dataset.num_channels
    images = rng.standard_normal((config.batch_size, size, size, channels)).astype(np.float32)
    labels = rng.integers(0, config.linear.num_classes, config.batch_size).astype(np.int32)
    return images, labels


def _random_state(setup):
    """A state of ``setup``'s shapes: floats uniform in [0.5, 1.5) (BN variances included),
    integers (the step) and the optimizer's moments zero."""
    rng = np.random.default_rng(0)

    def fill(path, x):
        moment = jax.tree_util.keystr(path).startswith(".opt_state")
        if moment or not jnp.issubdtype(x.dtype, jnp.floating):
            return jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)
        return jax.device_put(rng.uniform(0.5, 1.5, x.shape).astype(x.dtype), x.sharding)

    return jax.tree_util.tree_map_with_path(fill, setup.abstract_state())


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


@pytest.mark.parametrize("fine_tune", [False, True])
def test_the_linear_step_trains_only_the_classifier(fine_tune):
    overrides = {"linear.train_backbone": True, "linear.backbone_lr": 0.1} if fine_tune else {}
    config = _linear_tiny(**overrides)
    setup = moco_jax.build(config, 2, devices=jax.devices()[:2])
    state = _random_state(setup)  # no initialisation to compile: any values will do here
    before = _leaves({"params": state.params, "batch_stats": state.batch_stats})
    for seed in range(2):
        images, labels = _step_inputs(config, seed)
        state, metrics = setup.algorithm.train_step(
            state, shard_batch(setup.mesh, images), shard_batch(setup.mesh, labels)
        )
    after = _leaves({"params": state.params, "batch_stats": state.batch_stats})
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    classifier = {name for name in before if "'classifier'" in name}
    assert classifier <= changed
    if fine_tune:  # the whole encoder trains, BN in train mode
        assert any("'params'" in n and "'backbone'" in n for n in changed)
        assert any("'batch_stats'" in n for n in changed)
    else:  # frozen: weights and BN running statistics bit-equal
        assert changed == classifier, sorted(changed - classifier)[:5]


def test_the_protocol_lr_is_30_per_256_times_0_1_at_epochs_60_and_80():
    config = linear_config()
    config.batch_size = 512
    setup = moco_jax.build(set_fields(config, {"model.width_multiplier": 0.0625}), 10)
    schedule = setup.algorithm.schedule
    lrs = [float(schedule(epoch * 10)) for epoch in (0, 59, 60, 79, 80, 99)]
    np.testing.assert_allclose(lrs, [60, 60, 6, 6, 0.6, 0.6], rtol=1e-6)
    classifier = setup.abstract_state().params["classifier"]
    assert classifier["kernel"].shape == (128, 1000)  # 2048 x width 1/16
    assert classifier["bias"].shape == (1000,)


def _start(workdir, *overrides, fault=None, data_dir):
    env = dict(os.environ, MOCO_JAX_NO_PROGRESS="1")
    env["XLA_FLAGS"] = cpu_devices(8)
    if fault:
        env[f"MOCO_JAX_FAULT_{fault[0]}_AT_STEP"] = str(fault[1])
    entry = [str(ROOT / "tests/with_faults.py")] if fault else []  # installs faults.py
    command = [sys.executable, *entry, "-m", "moco_jax.evaluate", "linear"]
    command += ["--workdir", str(workdir)]
    command += ["--config", str(ROOT / "configs/linear_fashion_mnist.py"), *overrides]
    command += [f"--config.dataset.data_dir={data_dir}"]
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _linear_config(data_dir, pretrained, **overrides):
    config = linear_fashion_mnist.get_config()
    config.dataset.data_dir, config.linear.pretrained, config.epochs = data_dir, pretrained, EPOCHS
    overrides = {**SMALL, "optim.lr_milestones": (1,), "num_devices": 2, **overrides}
    return set_fields(config, overrides)


def _pretrained_workdir(workdir, data_dir):
    """What a pretraining workdir holds for linear evaluation: config.json and a checkpoint (of
    an initial MLP-backbone MoCo state: training it would add nothing here)."""
    from moco_jax.run.checkpointing import Checkpointer

    config = set_fields(tiny_config(), {**SMALL, "model.backbone": "mlp"})
    config.dataset.data_dir, config.dataset.image_size = data_dir, 28
    config.model.width_multiplier = 0.25
    setup = moco_jax.build(config, STEPS_PER_EPOCH, devices=jax.devices()[:1])
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(workdir / "checkpoints", config)
    checkpointer.save(STEPS_PER_EPOCH, setup.initial_state(seed=1), force=True)
    checkpointer.close()
    return str(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A linear run killed at step 11 (of 16) then resumed, and an uninterrupted one (in this
    process, first, so that the killed one finds its compiled functions in the cache), both
    from a pretraining workdir."""
    from moco_jax.run.linear_eval import evaluate_linear

    data_dir, root = fashion_mnist_data_dir(), tmp_path_factory.mktemp("linear")
    pretrained = _pretrained_workdir(root / "pretrained", data_dir)
    overrides = [f"--config.{k}={v}" for k, v in SMALL.items()]
    overrides += [f"--config.epochs={EPOCHS}", "--config.optim.lr_milestones=(1,)"]
    overrides += ["--config.num_devices=2", "--pretrained", pretrained]
    config = _linear_config(data_dir, pretrained)
    reference = evaluate_linear(config, root / "reference")  # first: fills the compile cache
    killed = _start(root / "interrupted", *overrides, fault=("KILL", 11), data_dir=data_dir)
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, err.decode()[-3000:]
    resumed = evaluate_linear(config, root / "interrupted")
    return {"root": root, "reference": reference, "resumed": resumed, "data_dir": data_dir}


def test_a_killed_linear_run_resumes_to_the_uninterrupted_result(runs):
    root = runs["root"]
    assert runs["resumed"] == runs["reference"]
    steps = EPOCHS * STEPS_PER_EPOCH
    assert_same_final_state(root / "interrupted", root / "reference", steps)


def test_the_linear_run_reports_like_the_official_script(runs):
    summary, workdir = runs["reference"], runs["root"] / "reference"
    assert json.loads((workdir / "summary.json").read_text()) == summary
    assert summary["backbone_unchanged"] is True  # the official sanity check
    assert summary["protocol"] == "linear" and summary["epochs"] == EPOCHS
    epochs = records(workdir)
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert summary["test_top1"] == epochs[-1]["test_top1"]
    assert summary["test_top5"] >= summary["test_top1"] > 10  # better than chance on 10 classes
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["backbone"] == "mlp"  # the pretrained run's architecture
    assert (workdir / "linear.png").stat().st_size > 0
    assert any((workdir / "tensorboard").iterdir())


def test_cached_features_agree_with_scikit_learn_logistic_regression(runs):
    """The same features (the pretrained MLP backbone on unaugmented images): our probe trained
    to convergence on them against scikit-learn's, within 1.5 points of test top-1."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    from moco_jax.data.tfds_source import load_arrays, prepared_builder
    from moco_jax.interop.init_from import load_encoder_weights
    from moco_jax.run.linear_eval import evaluate_linear, with_pretrained

    root, data_dir = runs["root"], runs["data_dir"]
    overrides = {
        "linear.cached_features": True,
        "epochs": 40,
        "optim.lr_milestones": (30, 35),
        "optim.base_lr": 1.0,
        "linear.eval_every_epochs": 40,
        "checkpoint.every_steps": 0,
        "log_every_steps": 8,  # a record an epoch, not one a step (320 steps)
        "dataset.max_train_examples": 2048,
        "dataset.max_test_examples": 1024,
        "batch_size": 256,
        "num_devices": 1,
    }
    config = _linear_config(data_dir, str(root / "pretrained"), **overrides)
    ours = evaluate_linear(config, root / "cached")["test_top1"]

    config = with_pretrained(config)
    setup = moco_jax.build(config, 1, devices=jax.devices()[:1])
    loaded = load_encoder_weights(config.init_from, setup.initial_state(), setup)
    builder = prepared_builder("fashion_mnist", data_dir)

    apply = jax.jit(lambda variables, x: setup.algorithm.model.apply(variables, x, train=False))

    def features(split, limit):
        images, labels = load_arrays(builder, split, limit)
        x = (images.astype(np.float32) / 255 - 0.28604) / 0.35302
        pooled, _ = apply(loaded.encoder_variables(), jnp.asarray(x))
        return np.asarray(pooled, np.float64), labels

    train_x, train_y = features("train", 2048)
    test_x, test_y = features("test", 1024)
    reference = linear_model.LogisticRegression(C=1e4, max_iter=5000).fit(train_x, train_y)
    theirs = 100 * reference.score(test_x, test_y)
    print(f"test top-1: ours {ours:.2f}%, scikit-learn {theirs:.2f}%")
    assert abs(ours - theirs) <= 1.5, (ours, theirs)


def test_the_linear_workdir_is_not_the_pretraining_one(tmp_path, monkeypatch):
    """Refused before anything is written (the lock, config.json, checkpoints), however either
    path is spelled: relative, with a trailing slash, through a symbolic link, a step directory;
    a workdir beside or below the pretraining run's (but not in its checkpoints) is its own."""
    from moco_jax.run.linear_eval import check_own_workdir

    run = tmp_path / "pre"
    (run / "checkpoints" / "8").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    step = run / "checkpoints" / "8"
    for workdir, pretrained in [
        (run, run),
        (f"{run}/", run),
        ("pre", run),
        (tmp_path / "link", run),
        (run, "link/"),
        (run, step),
        (run / "checkpoints", run),
        (step / "linear", run),
    ]:
        with pytest.raises(ConfigError, match=f"--workdir {re.escape(str(workdir))} is "):
            check_own_workdir(workdir, str(pretrained))
    for workdir in (run / "linear", tmp_path / "linear"):
        check_own_workdir(workdir, str(run))


def test_the_pretrained_source_is_compared_as_the_place_it_names(tmp_path, monkeypatch):
    from moco_jax.config.compatibility import SOURCE_FIELDS, refuse_other_config

    (tmp_path / "pre").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "pre")
    monkeypatch.chdir(tmp_path)
    saved = {"linear": {"pretrained": str(tmp_path / "pre")}}
    for same in ("pre", "pre/", "./link", f"{tmp_path}/pre/"):
        refuse_other_config(saved, {"linear": {"pretrained": same}}, SOURCE_FIELDS, "W")
    for other in ("other", None):
        with pytest.raises(ConfigError, match="Resume with the same --pretrained"):
            refuse_other_config(saved, {"linear": {"pretrained": other}}, SOURCE_FIELDS, "W")


def test_resuming_with_another_pretrained_source_is_refused(runs):
    """The run's checkpoints hold a classifier of the first source's features: continuing it
    with another backbone named would be silently wrong (it kept the old one)."""
    from moco_jax.run.linear_eval import evaluate_linear

    root, data_dir = runs["root"], runs["data_dir"]
    other = _pretrained_workdir(root / "other_pretrained", data_dir)
    before = sorted(p.name for p in (root / "reference").iterdir())
    message = (
        f"linear.pretrained '{root / 'pretrained'}' -> '{other}': checkpoint -> now). Resume "
        f"with the same --pretrained"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate_linear(_linear_config(data_dir, other), root / "reference")
    assert sorted(p.name for p in (root / "reference").iterdir()) == before


def test_pretrained_may_be_a_relative_step_directory(runs, monkeypatch):
    """orbax reads checkpoints by absolute paths only: a relative ``--pretrained`` (here a step
    directory: that step is taken) raised a traceback from inside it."""
    from moco_jax.interop.init_from import load_encoder_weights
    from moco_jax.run.linear_eval import with_pretrained

    root, data_dir = runs["root"], runs["data_dir"]
    monkeypatch.chdir(root)
    relative = os.path.join("pretrained", "checkpoints", str(STEPS_PER_EPOCH))
    config = with_pretrained(_linear_config(data_dir, relative, num_devices=1))
    setup = moco_jax.build(config, 1, devices=jax.devices()[:1])
    from_step = load_encoder_weights(config.init_from, setup.initial_state(), setup)
    from_workdir = load_encoder_weights(str(root / "pretrained"), setup.initial_state(), setup)
    _assert_same_arrays(from_step.encoder_variables(), from_workdir.encoder_variables())
    assert config.linear.pretrained == str(root / relative)  # the saved config names the place


def test_init_from_may_be_a_relative_path(runs, monkeypatch):
    """The same for a pretraining run's ``--config.init_from``."""
    from moco_jax.interop.init_from import load_encoder_weights
    from moco_jax.run.run_setup import setup_run

    root, data_dir = runs["root"], runs["data_dir"]
    monkeypatch.chdir(root)
    config = set_fields(tiny_config(), {**SMALL, "model.backbone": "mlp", "num_devices": 1})
    config.dataset.data_dir, config.dataset.image_size = data_dir, 28
    config.model.width_multiplier, config.init_from = 0.25, "pretrained"
    run = setup_run(config, root / "from_relative")
    try:
        expected = load_encoder_weights(
            str(root / "pretrained"), run.setup.initial_state(), run.setup
        )
        encoder = run.setup.algorithm.encoder_variables
        _assert_same_arrays(encoder(run.state), encoder(expected))
    finally:
        run.close()


def _assert_same_arrays(tree, expected_tree):
    expected, got = _leaves(expected_tree), _leaves(tree)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
