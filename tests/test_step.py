"""The multi-device step: sync BN equals one device, EMA extremes, metrics and BN modes."""

import jax
import numpy as np
import pytest
from parity_resnet import RESNET as TWO_BLOCK_RESNET

from moco_jax.mesh import replicated
from tiny import build, image_batches, run_steps, setup, tiny_config

# The EMA and Shuffle-BN contracts below hold for any encoder with BatchNorm: the MLP backbone
# (flatten, Linear-BN-ReLU) compiles in a fraction of ResNet-18's time. Sync BN across devices
# keeps a ResNet (BN over N, H, W of conv features): the library's ResNet and BasicBlock in two
# stages of one block (tests/parity_resnet.py: CIFAR stem, an identity block, a strided block
# with its downsample BN), every kind of layer of ResNet-18 in a quarter of its layers to compile.
MLP = {"model.backbone": "mlp", "model.width_multiplier": 0.125}


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_close(a, b, tol=2e-5):
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=str(path))


def _copied_to(state, mesh):
    """``state`` replicated over ``mesh`` through host memory: no buffer shared with ``state``,
    whose buffers the step donates."""
    host = jax.device_get(state.replace(rng=jax.random.key_data(state.rng)))
    placed = jax.device_put(host, replicated(mesh))
    impl = jax.random.key_impl(state.rng)
    return placed.replace(rng=jax.random.wrap_key_data(placed.rng, impl=impl))


def test_sync_bn_on_8_devices_equals_1_device_with_the_same_global_batch():
    config = tiny_config(
        **{"model.backbone": TWO_BLOCK_RESNET, "model.bn_mode": "sync", "moco.momentum": 0.9}
    )
    batches = image_batches(config, steps=3)
    built8, built1 = setup(config, 8), setup(config, 1)
    # One initial state for both meshes, its weights drawn by the rbg PRNG: XLA:CPU spends ~2 s
    # compiling threefry for each random parameter, rbg a fraction of that; where the starting
    # weights come from does not matter to the comparison, only that both runs share them.
    with jax.default_prng_impl("unsafe_rbg"):
        state8 = built8.initial_state()
    state1 = _copied_to(state8, built1.mesh)
    results = []
    for built, state in ((built8, state8), (built1, state1)):
        state, history = run_steps(built, state, batches)
        results.append((_to_numpy(state.replace(rng=jax.random.key_data(state.rng))), history))
    (state8, hist8), (state1, hist1) = results
    assert set(state8.params["backbone"]) == {"conv1", "bn1", "layer1_0", "layer2_0"}
    assert "downsample_bn" in state8.batch_stats["backbone"]["layer2_0"]
    for key in ("loss", "top1", "positive_similarity", "negative_similarity", "ema_distance"):
        np.testing.assert_allclose([h[key] for h in hist8], [h[key] for h in hist1], rtol=2e-5)
    for field in ("params", "batch_stats", "ema_params", "ema_batch_stats", "queue"):
        _assert_close(getattr(state8, field), getattr(state1, field))
    assert int(state8.queue_ptr) == int(state1.queue_ptr) == (3 * 64) % 96
    assert int(state8.step) == 3


@pytest.fixture(scope="module")
def local_bn_setup():
    """A compiled 8-device step with momentum 0; each test gets a fresh (donatable) state."""
    config = tiny_config(**MLP, **{"model.bn_mode": "local", "moco.momentum": 0.0})
    built, _ = build(config, 8)
    return built, built.initial_state


def test_momentum_zero_copies_the_online_weights_before_the_update(local_bn_setup):
    built, fresh_state = local_bn_setup
    state = fresh_state()
    before = _to_numpy(state.params)
    (images_q, images_k), second = image_batches(tiny_config(), steps=2)
    state, _ = run_steps(built, state, [(images_q, images_k)])
    after_first = _to_numpy(state.params)
    # After step 1 the key encoder equals the params at the *start* of step 1 ...
    _assert_close(state.ema_params, before, tol=0)
    state, _ = run_steps(built, state, [second])
    # ... and after step 2 it equals the params at the start of step 2.
    _assert_close(state.ema_params, after_first, tol=0)


def test_momentum_one_freezes_the_key_encoder():
    config = tiny_config(**MLP, **{"model.bn_mode": "local", "moco.momentum": 1.0})
    built, state = build(config, 8)
    initial = _to_numpy(state.ema_params)
    state, history = run_steps(built, state, image_batches(config, steps=2))
    _assert_close(state.ema_params, initial, tol=0)
    assert history[-1]["ema_distance"] > 0  # while the online encoder did move


def test_metrics_and_initial_state(local_bn_setup):
    built, fresh_state = local_bn_setup
    state = fresh_state()
    _assert_close(state.ema_params, state.params, tol=0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state.queue), axis=1), 1.0, rtol=1e-5)
    config = tiny_config()
    state, history = run_steps(built, state, image_batches(config, steps=3, seed=5))
    assert set(history[0]) == {
        "loss",
        "top1",
        "positive_similarity",
        "negative_similarity",
        "ema_distance",
        "learning_rate",
        "queue_ptr",
    }
    assert [h["queue_ptr"] for h in history] == [64, 32, 0]  # K=96, batch 64: wraps
    # Cosine over 1 epoch of 2 steps: epoch 0 at the peak lr (0.03 * 64 / 256).
    np.testing.assert_allclose([h["learning_rate"] for h in history[:2]], 0.0075, rtol=1e-6)
    for h in history:
        assert np.isfinite(h["loss"]) and 0.0 <= h["top1"] <= 1.0
        assert -1.0 <= h["negative_similarity"] <= 1.0


def test_shuffle_bn_changes_the_keys_but_not_the_contract(local_bn_setup):
    """Shuffle-BN on 8 devices runs, differs from local BN, and still enqueues unit keys."""
    config = tiny_config(**MLP, **{"model.bn_mode": "shuffle"})
    batches = image_batches(config, steps=1)
    built, state = build(config, 8)
    state, (metrics,) = run_steps(built, state, batches)
    # Local BN from the same initial state (same config.seed). Its momentum (0) does not change
    # the first step's keys: the key encoder starts as a copy of the query encoder.
    local_setup, fresh_local_state = local_bn_setup
    local_state, _ = run_steps(local_setup, fresh_local_state(), batches)
    keys = np.asarray(state.queue)[:64]
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(keys, np.asarray(local_state.queue)[:64], atol=1e-4)
    assert np.isfinite(metrics["loss"])
