"""MoCo v3 through the whole workflow on real Fashion-MNIST: pretraining in bfloat16 with the
kNN monitor, the frozen patch projection, exact resume, linear evaluation of the pretrained
workdir.

One tiny run (``configs/moco_v3_vit_fashion_mnist.py`` with ``vit_test`` computing in bfloat16,
256 training and 256 test images, 2 epochs of 4 steps, a checkpoint every 2 steps; the colour
jitter off: it compiles for seconds, and test_augment checks it) goes through
``train_and_evaluate`` in this process. A copy of its workdir that lost every checkpoint after
step 2 (a run killed there, mid-epoch) is rerun with the same config: it must end bit-for-bit on
the uninterrupted run's state (online network, momentum encoder, AdamW moments, step) and
records, so the momentum and lr schedules, the optimizer state and the data order all resume
from the step. The linear protocol then reads that workdir (a ViT backbone without BatchNorm,
the v3 state's ``{backbone, head, predictor}``).
"""

import json
import shutil

import numpy as np
import pytest
from data_fixtures import fashion_mnist_data_dir
from workdirs import assert_same_final_state, final_arrays, records

from configs import linear_fashion_mnist, moco_v3_vit_fashion_mnist

KILLED_AFTER = 2  # the copy keeps this step's checkpoint and loses the later ones
STEPS = 8  # 2 epochs of 256 images / batch 64


def _config(data_dir):
    config = moco_v3_vit_fashion_mnist.get_config()
    config.dataset.data_dir = data_dir
    # As many test images as training ones: the kNN's feature function compiles for one shape.
    config.dataset.max_train_examples = 256
    config.dataset.max_test_examples = 256
    config.batch_size = 64
    config.epochs = 2
    config.optim.warmup_epochs = 1
    config.model.backbone = "vit_test"
    config.model.mlp_dim = 64
    config.model.dim = 32
    config.model.dtype = "bfloat16"  # mixed precision end to end (float32 state and gradients)
    config.augment.jitter_prob = 0.0  # compiles for seconds; the views' other ops are random too
    config.checkpoint.every_steps = KILLED_AFTER
    config.checkpoint.keep = 10
    config.log_every_steps = 1
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from moco_jax.run.trainer import train_and_evaluate

    root = tmp_path_factory.mktemp("v3_workflow")
    config = _config(fashion_mnist_data_dir())
    config.show.at_end = True  # the pictures after training, once (evaluate show's own tests)
    summary = train_and_evaluate(config, str(root / "reference"))
    config.show.at_end = False
    shutil.copytree(root / "reference", root / "resumed")
    for step_dir in (root / "resumed" / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > KILLED_AFTER:
            shutil.rmtree(step_dir)
    resumed_summary = train_and_evaluate(config, str(root / "resumed"))
    return root, summary, resumed_summary


def test_v3_pretraining_reports_knn_every_epoch(runs):
    root, summary, _ = runs
    epochs = records(root / "reference")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for record in epochs:
        assert np.isfinite(record["loss"]) and 0 <= record["knn_head"] <= 100
    for key in ("final_knn_head", "final_knn_backbone", "random_init_knn_head", "knn_pixels"):
        assert key in summary, key
    metrics = records(root / "reference", "metrics.jsonl")
    momentum = [r["moco_momentum"] for r in metrics if "moco_momentum" in r]
    assert momentum[0] == pytest.approx(0.99, abs=1e-3) and momentum[-1] > momentum[0]


def test_the_pictures_are_written_after_training(runs):
    """``show.at_end``: neighbours.png and embedding.png beside pretraining.png."""
    root, _, _ = runs
    for name in ("neighbours.png", "embedding.png", "pretraining.png"):
        assert (root / "reference" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_killed_v3_run_resumes_bit_for_bit(runs):
    root, summary, resumed_summary = runs
    assert_same_final_state(root / "resumed", root / "reference", STEPS)
    metrics = "metrics.jsonl"
    assert records(root / "resumed", metrics) == records(root / "reference", metrics)
    assert resumed_summary == summary
    _, arrays = final_arrays(root / "reference")
    floats = {str(a.dtype) for a in arrays.values() if np.issubdtype(a.dtype, np.floating)}
    assert floats == {"float32"}  # bfloat16 compute, float32 state


def test_the_patch_projection_stays_as_initialised(runs):
    """stop_grad_conv1 through the whole run (AdamW with weight decay, the momentum encoder): the
    final online patch projection is bit-equal to the initial one (no gradient, no decay), and the
    momentum one equal up to float32 rounding (``x * m + x * (1 - m)`` is x or 1 ulp from it, in
    the official ``param_m * m + param_b * (1 - m)`` too: 2 of 1024 weights after 8 steps with
    the tests' XLA flags), while the blocks moved."""
    import jax

    import moco_jax

    root, _, _ = runs
    setup = moco_jax.build(_config(fashion_mnist_data_dir()), STEPS // 2)

    def initial_arrays():  # jitted: the rest of the initialisation is dead code, not compiled
        backbone = setup.algorithm.init_state(jax.random.key(setup.config.seed)).params["backbone"]
        return backbone["patch_embed"]["proj"], backbone["blocks_0"]["attn"]["qkv"]["kernel"]

    projection, qkv = jax.device_get(jax.jit(initial_arrays)())
    _, arrays = final_arrays(root / "reference")
    for leaf in ("kernel", "bias"):
        name = f"['params']['backbone']['patch_embed']['proj']['{leaf}']"
        np.testing.assert_array_equal(arrays[name], projection[leaf], err_msg=name)
        ema = arrays[name.replace("'params'", "'ema_params'")]
        np.testing.assert_allclose(ema, projection[leaf], rtol=5e-7, atol=0, err_msg=name)
    assert not np.allclose(
        arrays["['params']['backbone']['blocks_0']['attn']['qkv']['kernel']"], qkv
    )


def test_linear_evaluation_of_a_v3_vit_workdir(runs, tmp_path):
    from moco_jax.run.linear_eval import evaluate_linear

    root, _, _ = runs
    config = linear_fashion_mnist.get_config()
    config.dataset = _config(fashion_mnist_data_dir()).dataset  # the pretraining's 256 images
    config.augment.crop = False  # flips only: the crop compiles for seconds (test_augment's)
    config.batch_size = 64
    config.epochs = 1
    summary = evaluate_linear(config, str(tmp_path / "linear"), pretrained=str(root / "reference"))
    assert summary["backbone_unchanged"] is True
    assert 0 <= summary["test_top1"] <= 100
    saved = json.loads((tmp_path / "linear" / "config.json").read_text())
    assert saved["model"]["backbone"] == "vit_test"  # taken from the pretrained run
