"""MoCo v3 (``config.algorithm = "moco_v3"``) against an independent float64 NumPy re-statement
of moco-v3 (``tests/numpy_moco_v3.py``), and its pieces: the positive index across devices, the
momentum and lr schedules, LARS's and AdamW's masks, the frozen patch projection, zero-init
residual blocks, sync BN on 8 devices against 1.

The step tests use the ``mlp`` backbone and tiny heads (each compiles in a few seconds).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_moco_v3 as ref
import optax
import pytest
from jax.sharding import PartitionSpec as P

import numpy_moco as ref_v2
from moco_jax import build
from moco_jax.algorithms.contrastive import contrastive_loss, gathered_keys, positive_indices
from moco_jax.algorithms.momentum_schedule import momentum_schedule
from moco_jax.config_defaults import base_config
from moco_jax.mesh import DATA_AXIS, make_data_mesh, shard_batch
from moco_jax.models import build_encoder, resnet
from moco_jax.models.encoder import build_predictor
from moco_jax.optim import lars, make_lr_schedule, make_v3_optimizer

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
    is_kind = lambda x: isinstance(x, kind)  # noqa: E731
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
    state = built.initial_state(seed=3)
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
        state, metrics = built.algorithm.train_step(
            state, shard_batch(built.mesh, x1), shard_batch(built.mesh, x2)
        )
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
        fresh = lambda width: {"mean": np.zeros(width), "var": np.ones(width)}  # noqa: E731
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
        state = built.initial_state(seed=1)
        data, history = np.random.default_rng(4), []
        for _ in range(2):
            x1, x2 = (data.normal(size=(16, *IMAGE_SHAPE)).astype(np.float32) for _ in range(2))
            state, metrics = built.algorithm.train_step(
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


def test_positive_index_across_devices():
    """On device r, row i's positive is gathered key i + N * r: the loss of each device equals
    the cross-entropy written on the global batch with the diagonal as labels."""
    mesh = make_data_mesh(8, jax.devices()[:8])
    rows, dim, t = 3, 5, 0.5
    rng = np.random.default_rng(7)
    q = rng.normal(size=(8 * rows, dim)).astype(np.float32)
    k = rng.normal(size=(8 * rows, dim)).astype(np.float32)

    def per_device(q, k):
        loss, _, labels = contrastive_loss(q, gathered_keys(k, DATA_AXIS), t, DATA_AXIS)
        return loss[None], labels, positive_indices(rows, DATA_AXIS)

    losses, labels, indices = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(DATA_AXIS), P(DATA_AXIS)),
            out_specs=(P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
        )
    )(shard_batch(mesh, q), shard_batch(mesh, k))
    np.testing.assert_array_equal(labels, np.arange(8 * rows))
    np.testing.assert_array_equal(indices, np.arange(8 * rows))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    logits = unit(q.astype(np.float64)) @ unit(k.astype(np.float64)).T / t
    per_row = np.log(np.exp(logits).sum(1)) - np.diag(logits)
    expected = 2 * t * per_row.reshape(8, rows).mean(1)  # each device's mean, times 2T
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_momentum_schedule_values():
    """m = 1 - 0.5 (1 + cos(pi e / E)) (1 - m0) at the fractional epoch e; constant without
    the cosine."""
    steps_per_epoch, epochs, m0 = 10, 3, 0.99
    cosine = momentum_schedule(m0, True, steps_per_epoch, epochs)
    for step in (0, 1, 7, 15, 29, 30):
        expected = ref.cosine_momentum(m0, step, steps_per_epoch, epochs)
        np.testing.assert_allclose(cosine(jnp.int32(step)), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(cosine(15), 1 - 0.5 * (1 - m0), atol=1e-7)  # half-way
    np.testing.assert_allclose(cosine(30), 1.0, atol=1e-7)
    constant = momentum_schedule(m0, False, steps_per_epoch, epochs)
    assert float(constant(0)) == float(constant(29)) == np.float32(m0)


def test_warmup_cosine_lr_values():
    """lr = base_lr * batch / 256, linear from 0 over the warm-up epochs per step, then the
    half-cycle cosine (main_moco.py's adjust_learning_rate at e = epoch + i / iters)."""
    config = base_config()
    config.optim.base_lr, config.optim.schedule, config.optim.warmup_epochs = 1.5e-4, "", 4
    config.optim.schedule = "warmup_cosine"
    steps_per_epoch, epochs, batch = 5, 10, 4096
    schedule = make_lr_schedule(config.optim, batch, steps_per_epoch, epochs)
    peak = 1.5e-4 * batch / 256
    for step in (0, 1, 3, 19, 20, 21, 34, 49, 50):
        expected = ref.warmup_cosine_lr(peak, step, steps_per_epoch, epochs, 4)
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-12)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(20), peak, rtol=1e-6)  # end of the warm-up
    np.testing.assert_allclose(schedule(35), peak / 2, rtol=1e-6)  # half-way through the cosine
    config.optim.warmup_epochs = 0
    schedule = make_lr_schedule(config.optim, batch, steps_per_epoch, epochs)
    np.testing.assert_allclose(schedule(0), peak, rtol=1e-6)


def _tree():
    rng = np.random.default_rng(0)
    return {
        "backbone": {
            "patch_embed": {"proj": {"kernel": rng.normal(size=(2, 2, 1, 4)), "bias": np.ones(4)}},
            "fc": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
        },
        "head": {"fc1": {"scale": rng.normal(size=3)}},
    }


def _frozen(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: "patch_embed" in str(p), params)


def test_lars_masks_and_optax_lars_at_a_constant_lr():
    """LARS: no weight decay and no trust ratio on 1-D tensors (a zero gradient leaves them
    alone, a 1-D gradient is applied as is), both on ndim > 1; at a constant lr it is
    ``optax.lars`` (only the order of momentum and lr differ, which a constant lr hides)."""
    params = jax.tree.map(jnp.asarray, _tree())
    zeros = jax.tree.map(jnp.zeros_like, params)
    config = base_config().optim
    config.name, config.weight_decay = "lars", 0.5
    optimizer = make_v3_optimizer(config, lambda _: 0.1)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        p = _leaf(params, path)
        if p.ndim > 1:  # decay 0.5 p times the trust ratio 0.001 |p| / |0.5 p|: 0.001 p
            np.testing.assert_allclose(u, -0.1 * 0.001 * p, rtol=1e-5, err_msg=str(path))
        else:
            np.testing.assert_array_equal(u, 0.0, err_msg=str(path))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    ours, official = lars(lambda _: 0.1, 0.5, 0.9), optax.lars(
        0.1, 0.5, lambda t: jax.tree.map(lambda p: p.ndim > 1, t),
        trust_ratio_mask=lambda t: jax.tree.map(lambda p: p.ndim > 1, t),
    )  # fmt: skip
    state_a, state_b, pa, pb = ours.init(params), official.init(params), params, params
    for _ in range(3):
        ua, state_a = ours.update(grads, state_a, pa)
        ub, state_b = official.update(grads, state_b, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), pa, pb)
    one_d = lambda u: u["backbone"]["fc"]["bias"]  # noqa: E731
    u, _ = ours.update(grads, ours.init(params), params)
    np.testing.assert_allclose(one_d(u), -0.1 * 0.3, rtol=1e-6)  # no ratio, no decay


def _leaf(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree


@pytest.mark.parametrize("name", ["adamw", "lars"])
def test_frozen_tensors_never_move(name):
    """Tensors marked frozen (the ViT patch projection with stop_grad_conv1) stay bit for bit
    the same under non-zero gradients and weight decay; AdamW decays every other tensor, 1-D
    ones included, as torch.optim.AdamW on moco-v3's trainable parameters."""
    params = jax.tree.map(jnp.asarray, _tree())
    config = base_config().optim
    config.name, config.weight_decay = name, 0.1
    optimizer = make_v3_optimizer(config, lambda _: 0.01, _frozen)
    state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    new = params
    for _ in range(3):
        updates, state = optimizer.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    frozen = new["backbone"]["patch_embed"]["proj"]
    np.testing.assert_array_equal(
        frozen["kernel"], params["backbone"]["patch_embed"]["proj"]["kernel"]
    )
    np.testing.assert_array_equal(frozen["bias"], params["backbone"]["patch_embed"]["proj"]["bias"])
    assert not np.allclose(new["backbone"]["fc"]["bias"], params["backbone"]["fc"]["bias"])
    if name == "adamw":  # zero gradient, fresh moments: only the decoupled decay moves a tensor
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = optimizer.update(zeros, optimizer.init(new), new)
        scale = new["head"]["fc1"]["scale"]
        np.testing.assert_allclose(updates["head"]["fc1"]["scale"], -0.01 * 0.1 * scale, rtol=1e-2)


def test_vit_step_keeps_the_frozen_patch_projection():
    """The whole v3 step on vit_test with stop_grad_conv1: the patch projection is bit-equal
    after two steps (no gradient, no decay, no EMA drift) while the blocks move."""
    config = v3_config(1, "sync", "v3_vit", "adamw", 0.5, 0.1, 8)
    config.model.backbone = "vit_test"
    config.model.stop_grad_conv1 = True
    config.dataset.image_size = 8
    built = build(config, STEPS_PER_EPOCH, devices=jax.devices()[:1])
    state = built.initial_state()
    before = jax.device_get(state.params)
    data = np.random.default_rng(0)
    for _ in range(2):
        x1, x2 = (data.normal(size=(8, 8, 8, 1)).astype(np.float32) for _ in range(2))
        state, _ = built.algorithm.train_step(
            state, shard_batch(built.mesh, x1), shard_batch(built.mesh, x2)
        )
    after, ema = jax.device_get(state.params), jax.device_get(state.ema_params)
    for leaf in ("kernel", "bias"):
        proj = before["backbone"]["patch_embed"]["proj"][leaf]
        np.testing.assert_array_equal(after["backbone"]["patch_embed"]["proj"][leaf], proj)
        np.testing.assert_array_equal(ema["backbone"]["patch_embed"]["proj"][leaf], proj)
    moved = after["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert not np.allclose(moved, before["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"])


@pytest.mark.parametrize("block", ["BasicBlock", "Bottleneck"])
def test_zero_init_residual(block):
    """model.zero_init_residual zeroes the last BN scale of every residual block (torchvision's
    zero_init_residual, which moco-v3 sets), and only that one."""
    config = base_config().model
    config.backbone, config.width_multiplier, config.cifar_stem = "resnet18", 0.0625, True
    config.zero_init_residual = True
    net = build_encoder(config).backbone.clone(
        stage_sizes=[1, 1], block_cls=getattr(resnet, block)
    )  # two stages of one block: small to compile, a downsample included
    params = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)  # eager: no compile
    last = "bn2" if block == "BasicBlock" else "bn3"
    blocks = {k: v for k, v in params["params"].items() if k.startswith("layer")}
    assert set(blocks) == {"layer1_0", "layer2_0"}
    for name, blk in blocks.items():
        np.testing.assert_array_equal(blk[last]["scale"], 0.0, err_msg=name)
        np.testing.assert_array_equal(blk["bn1"]["scale"], 1.0, err_msg=name)
    np.testing.assert_array_equal(blocks["layer2_0"]["downsample_bn"]["scale"], 1.0)


def test_v3_head_layouts():
    """The v3 heads are bias-free BN MLPs named as the official Sequential (fc0, fc1, fc3, ...),
    the last BN without parameters; the predictor's last BN as builder.py's MoCo_ResNet
    (none) / MoCo_ViT (one)."""
    config = base_config()
    config.model.backbone, config.model.width_multiplier = "mlp", 0.125  # 8 features
    config.model.mlp_dim, config.model.dim = 12, 4
    for head, projector_bns, predictor_bns in [
        ("v3_resnet", {"fc1", "fc4"}, {"fc1"}),
        ("v3_vit", {"fc1", "fc4", "fc7"}, {"fc1", "fc4"}),
    ]:
        config.model.head = head
        encoder = build_encoder(config.model)
        shapes = jax.eval_shape(
            lambda e=encoder: e.init(jax.random.key(0), jnp.zeros((1, 2, 2, 2)), train=False)
        )
        projector = jax.tree.map(lambda x: x.shape, shapes["params"]["head"])
        kernels = {k: v["kernel"] for k, v in projector.items() if "kernel" in v}
        expected = [(8, 12), (12, 4)] if head == "v3_resnet" else [(8, 12), (12, 12), (12, 4)]
        assert list(kernels.values()) == expected, projector
        assert all(set(v) == {"kernel"} or set(v) == {"scale", "bias"} for v in projector.values())
        assert set(shapes["batch_stats"]["head"]) == projector_bns
        affine = {k for k, v in projector.items() if "scale" in v}
        assert affine == projector_bns - {max(projector_bns)}  # the last BN has no parameters
        predictor = build_predictor(config.model)
        shapes = jax.eval_shape(
            lambda p=predictor: p.init(jax.random.key(0), jnp.zeros((1, 4)), train=False)
        )
        assert set(shapes["batch_stats"]) == predictor_bns
        kernels = [v["kernel"].shape for v in shapes["params"].values() if "kernel" in v]
        assert kernels == [(4, 12), (12, 4)]


@pytest.mark.parametrize(
    "name,algorithm_fields",
    [
        ("moco_v3_resnet50_imagenet", ("lars", "v3_resnet", 4096, 1.0, (0.2, 1.0))),
        ("moco_v3_vit_small_imagenet", ("adamw", "v3_vit", 4096, 0.2, (0.08, 1.0))),
        ("moco_v3_vit_base_imagenet", ("adamw", "v3_vit", 4096, 0.2, (0.08, 1.0))),
        ("moco_v3_resnet_fashion_mnist", ("lars", "v3_resnet", 256, 1.0, (0.2, 1.0))),
        ("moco_v3_vit_fashion_mnist", ("adamw", "v3_vit", 256, 0.2, (0.08, 1.0))),
    ],
)
def test_v3_configs_validate(name, algorithm_fields):
    """Each MoCo v3 config passes validation with moco-v3's settings and BYOL's views."""
    import importlib

    from moco_jax import validate_config

    config = importlib.import_module(f"configs.{name}").get_config()
    validate_config(config, 8)
    optimizer, head, batch, temperature, crop = algorithm_fields
    assert (config.algorithm, config.optim.name, config.model.head) == ("moco_v3", optimizer, head)
    assert (config.batch_size, config.moco.temperature) == (batch, temperature)
    assert tuple(config.augment.crop_scale) == crop
    assert (config.moco.momentum, config.moco.momentum_cosine) == (0.99, True)
    assert (config.model.bn_mode, config.optim.schedule) == ("sync", "warmup_cosine")
    assert tuple(config.augment.blur_prob) == (1.0, 0.1)
    assert tuple(config.augment.solarize_prob) == (0.0, 0.2)
    assert tuple(config.augment.jitter) == (0.4, 0.4, 0.2, 0.1)
    assert config.model.stop_grad_conv1 == (head == "v3_vit")
    assert config.model.zero_init_residual == (head == "v3_resnet")
