"""MoCo v3's pieces: the positive index across devices, the momentum and lr schedules, LARS's
and AdamW's masks, the frozen patch projection, zero-init residual blocks, the heads and configs
(the whole step against NumPy: ``test_moco_v3.py``; the patch projection frozen through a whole
run's steps: ``test_moco_v3_workflow.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_moco_v3 as ref
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moco_jax.algorithms.contrastive import contrastive_loss, gathered_keys, positive_indices
from moco_jax.algorithms.momentum_schedule import momentum_schedule
from moco_jax.config.defaults import base_config
from moco_jax.mesh import DATA_AXIS, make_data_mesh, shard_batch
from moco_jax.models import build_encoder, resnet
from moco_jax.models.encoder import build_predictor
from moco_jax.optim import lars, make_lr_schedule, make_optimizer


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
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
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
    optimizer = make_optimizer(config, lambda _: 0.1)
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
    one_d = lambda u: u["backbone"]["fc"]["bias"]
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
    optimizer = make_optimizer(config, lambda _: 0.01, _frozen)
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

    def block_bn_scales():
        """Every BN scale of every block: jitted, the rest of the initialisation (the convs'
        random kernels, seconds to compile) is dead code, left out of the program."""
        params = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)["params"]
        return {
            name: {layer: leaves["scale"] for layer, leaves in blk.items() if "scale" in leaves}
            for name, blk in params.items()
            if name.startswith("layer")
        }

    blocks = jax.jit(block_bn_scales)()
    last = "bn2" if block == "BasicBlock" else "bn3"
    assert set(blocks) == {"layer1_0", "layer2_0"}
    for name, blk in blocks.items():
        assert "bn1" in blk, name
        np.testing.assert_array_equal(blk[last], 0.0, err_msg=name)
        for layer in set(blk) - {last}:  # bn1, the Bottleneck's bn2, the downsample's BN
            np.testing.assert_array_equal(blk[layer], 1.0, err_msg=f"{name} {layer}")
    assert "downsample_bn" in blocks["layer2_0"]


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
