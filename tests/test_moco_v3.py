"""MoCo v3 (``config.algorithm = "moco_v3"``) against an independent float64 NumPy re-statement
of moco-v3 (``tests/numpy_moco_v3.py``), and sync BN on 8 devices against 1 (its other pieces:
``test_moco_v3_parts.py``).

The step tests use the ``mlp`` backbone and tiny heads (each compiles in a few seconds).
"""

from __future__ import annotations

import jax
import numpy as np
import numpy_moco_v3 as ref
import optax
import pytest

import numpy_moco as ref_v2
from moco_jax import build
from moco_jax.config.defaults import base_config
from moco_jax.mesh import shard_batch

ATOL = RTOL = 1e-5
NUM_STEPS = 3
STEPS_PER_EPOCH = 2
EPOCHS = 4
WARMUP_EPOCHS = 1
IMAGE_SHAPE = (4, 4, 1)
M0 = 0.9
TEMPERATURE = 0.2

# name: (devices, bn_mode, head, optimizer, base lr per 256, weight decay, global batch).
CASES = {
    "sync-8dev-resnet-lars": (8, "sync", "v3_resnet", "lars", 40.0, 1e-2, 16),
    "sync-8dev-vit-adamw": (8, "sync", "v3_vit", "adamw", 0.5, 0.1, 16),
    "local-8dev-vit-lars": (8, "local", "v3_vit", "lars", 10.0, 1e-2, 64),
}
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_max_diffs():
    """Prints the largest |moco_jax - reference| per quantity (visible with ``pytest -s``)."""
    yield
    if MAX_DIFFS:
        print("\nmax |moco_jax - numpy reference| over all cases and steps:")
        for name, diff in sorted(MAX_DIFFS.items()):
            print(f"  {name:34s} {diff:.2e}")


def _compare(name, actual, expected, atol=ATOL, rtol=RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    diff = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    key = name.split("/")[0]
    MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), diff)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=name)


def _compare_tree(name, actual, expected):
    actual = dict(ref_v2.tree_items(jax.device_get(actual)))
    expected = dict(ref_v2.tree_items(expected))
    assert actual.keys() == expected.keys(), (name, actual.keys(), expected.keys())
    for path in expected:
        _compare(f"{name}/{path}", actual[path], expected[path])


def v3_config(num_devices, bn_mode, head, optimizer, base_lr, weight_decay, batch):
    config = base_config()
    config.algorithm = "moco_v3"
    config.batch_size = batch
    config.epochs = EPOCHS
    config.num_devices = num_devices
    config.dataset.image_size = IMAGE_SHAPE[0]
    config.dataset.num_channels = IMAGE_SHAPE[2]
    config.dataset.mean, config.dataset.std = (0.5,), (0.25,)
    config.model.backbone = "mlp"
    config.model.width_multiplier = 0.125  # backbone width 8
    config.model.head = head
    config.model.mlp_dim = 12
    config.model.dim = 6
    config.model.bn_mode = bn_mode
    config.moco.momentum = M0
    config.moco.momentum_cosine = True
    config.moco.temperature = TEMPERATURE
    config.optim.name = optimizer
    config.optim.base_lr = base_lr
    config.optim.weight_decay = weight_decay
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_epochs = WARMUP_EPOCHS
    config.optim.lr_milestones = ()
    return config


def _optimizer_buffers(opt_state, optimizer):
    """``{"mu": ...}`` (LARS momentum) or ``{"mu", "nu"}`` (AdamW moments) of the optax state."""
    kind = optax.TraceState if optimizer == "lars" else optax.ScaleByAdamState
    is_kind = lambda x: isinstance(x, kind)
    nodes = [x for x in jax.tree.leaves(opt_state, is_leaf=is_kind) if is_kind(x)]
    assert len(nodes) == 1, nodes
    if optimizer == "lars":
        return {"mu": nodes[0].trace}
    return {"mu": nodes[0].mu, "nu": nodes[0].nu}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_matches_numpy_reference(case):
    """Three steps of moco_jax == three steps of the NumPy moco-v3, quantity by quantity.

    Covers: the online network (backbone, projector, predictor) on both views with BN
    statistics per view and running statistics updated view 1 then view 2; the momentum update
    with the cosine m before the keys; keys gathered from every device with the positive at
    ``i + N * r``; the symmetric loss times 2T; LARS (trust ratio and decay on ndim > 1 only) or
    AdamW (decoupled decay on every tensor) under the per-step warm-up + cosine lr; synchronised
    and per-device BN.
    """
    num_devices, bn_mode, head, optimizer, base_lr, weight_decay, batch = CASES[case]
    config = v3_config(*CASES[case])
    built = build(config, STEPS_PER_EPOCH, devices=jax.devices()[:num_devices])
    state = built.initial_state(3)
    train_step = built.algorithm.train_step
    init = jax.device_get(state)
    model = ref.MoCoV3Reference(
        init.params,
        init.batch_stats,
        layout=head,
        temperature=TEMPERATURE,
        optimizer=optimizer,
        weight_decay=weight_decay,
    )
    _compare_tree("initial ema_params", init.ema_params, model.ema_params)
    per_device = batch // num_devices
    if bn_mode == "sync":
        groups = [np.arange(batch)]
    else:
        groups = [d * per_device + np.arange(per_device) for d in range(num_devices)]
    peak = base_lr * batch / 256

    data = np.random.default_rng(0)
    for step in range(NUM_STEPS):
        x1 = data.normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)
        x2 = data.normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)
        lr = ref.warmup_cosine_lr(peak, step, STEPS_PER_EPOCH, EPOCHS, WARMUP_EPOCHS)
        m = ref.cosine_momentum(M0, step, STEPS_PER_EPOCH, EPOCHS)
        out = model.step(x1, x2, lr, m, groups)
        state, metrics = train_step(state, shard_batch(built.mesh, x1), shard_batch(built.mesh, x2))
        metrics = jax.device_get(metrics)

        _compare("loss", metrics["loss"], out["loss"])
        _compare("learning_rate", metrics["learning_rate"], lr)
        _compare("moco_momentum", metrics["moco_momentum"], m)
        logits = np.concatenate(out["logits"])
        labels = np.tile(np.arange(batch), 2)
        _compare("top1", metrics["top1"], np.mean(np.argmax(logits, axis=1) == labels))
        _compare(
            "positive_similarity",
            metrics["positive_similarity"],
            np.mean(logits[np.arange(2 * batch), labels]) * TEMPERATURE,
        )
        _compare_tree("params", state.params, model.params)
        _compare_tree("ema_params", state.ema_params, model.ema_params)
        _compare_tree("batch_stats", state.batch_stats, model.batch_stats)
        _compare_tree("ema_batch_stats", state.ema_batch_stats, model.ema_batch_stats)
        buffers = _optimizer_buffers(state.opt_state, optimizer)
        _compare_tree("optimizer mu", buffers["mu"], model.mu)
        if optimizer == "adamw":
            _compare_tree("optimizer nu", buffers["nu"], model.nu)
        assert int(state.step) == step + 1
    assert set(state.params) == {"backbone", "head", "predictor"}
    assert set(state.ema_params) == {"backbone", "head"}


def test_reference_gradients_match_finite_differences():
    """The reference's hand-written backward passes (through the BN MLPs with and without a last
    BN, normalisation and the 2T-scaled cross-entropy) agree with central differences."""
    rng = np.random.default_rng(2)
    n, d_in, hidden, dim, t = 6, 5, 4, 3, 0.3
    groups = [np.arange(3), np.arange(3, 6)]

    def mlp_params(d0, layers, last_bn):
        params = {}
        for layer in range(layers):
            last = layer == layers - 1
            params[f"fc{3 * layer}"] = {
                "kernel": rng.normal(size=(d0 if layer == 0 else hidden, dim if last else hidden))
            }
            if not last:
                params[f"fc{3 * layer + 1}"] = {
                    "scale": 1 + 0.3 * rng.normal(size=hidden),
                    "bias": rng.normal(size=hidden),
                }
        return params

    params = {"head": mlp_params(d_in, 3, True), "predictor": mlp_params(dim, 2, False)}
    x = rng.normal(size=(n, d_in))
    k = rng.normal(size=(n, dim))

    def stats():
        fresh = lambda width: {"mean": np.zeros(width), "var": np.ones(width)}
        return {"fc1": fresh(hidden), "fc4": fresh(hidden), "fc7": fresh(dim)}

    def loss_and_grads(p):
        z, head_cache = ref.mlp_forward(p["head"], stats(), x, 3, True, groups)
        q, pred_cache = ref.mlp_forward(p["predictor"], stats(), z, 2, False, groups)
        loss, dq, _ = ref.contrastive(q, k, t)
        grads = {}
        grads["predictor"], dz = ref.mlp_backward(p["predictor"], pred_cache, dq)
        grads["head"], _ = ref.mlp_backward(p["head"], head_cache, dz)
        return loss, grads

    ref_v2.finite_difference_check(params, loss_and_grads)


def test_sync_bn_on_8_devices_equals_1_device_with_the_same_global_batch():
    """SyncBN over 8 devices (BN in backbone, projector and predictor) and the all-gathered
    keys give the step of one device holding the whole batch."""
    results = []
    for devices in (8, 1):
        config = v3_config(devices, "sync", "v3_vit", "lars", 40.0, 1e-2, 16)
        built = build(config, STEPS_PER_EPOCH, devices=jax.devices()[:devices])
        state = built.initial_state(1)
        train_step = built.algorithm.train_step
        data, history = np.random.default_rng(4), []
        for _ in range(2):
            x1, x2 = (data.normal(size=(16, *IMAGE_SHAPE)).astype(np.float32) for _ in range(2))
            state, metrics = train_step(
                state, shard_batch(built.mesh, x1), shard_batch(built.mesh, x2)
            )
            history.append(jax.device_get(metrics))
        results.append((jax.device_get(state), history))
    (state8, hist8), (state1, hist1) = results
    for key in hist8[0]:
        np.testing.assert_allclose(
            [h[key] for h in hist8], [h[key] for h in hist1], rtol=2e-5, atol=1e-6, err_msg=key
        )
    for field in ("params", "batch_stats", "ema_params", "ema_batch_stats", "opt_state"):
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(getattr(state8, field))[0],
            jax.tree.leaves(getattr(state1, field)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"{field}{path}")
