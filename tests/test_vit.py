"""ViT backbones: moco-v3's parameter counts, the sin-cos table, the initialisation, timm's names,
the frozen patch projection, bfloat16, and a forward pass against a PyTorch re-statement."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from moco_jax.models import build_encoder, get_backbone_factory
from moco_jax.models.vit import VisionTransformer, flax_path, sincos_position_embedding, timm_name

# The state dict of timm's VisionTransformer (moco-v3's vits.py) of depth 2, head removed.
EXPECTED_TIMM_KEYS = [
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "blocks.0.norm1.weight",
    "blocks.0.norm1.bias",
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight",
    "blocks.0.attn.proj.bias",
    "blocks.0.norm2.weight",
    "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight",
    "blocks.0.mlp.fc1.bias",
    "blocks.0.mlp.fc2.weight",
    "blocks.0.mlp.fc2.bias",
    "blocks.1.norm1.weight",
    "blocks.1.norm1.bias",
    "blocks.1.attn.qkv.weight",
    "blocks.1.attn.qkv.bias",
    "blocks.1.attn.proj.weight",
    "blocks.1.attn.proj.bias",
    "blocks.1.norm2.weight",
    "blocks.1.norm2.bias",
    "blocks.1.mlp.fc1.weight",
    "blocks.1.mlp.fc1.bias",
    "blocks.1.mlp.fc2.weight",
    "blocks.1.mlp.fc2.bias",
    "norm.weight",
    "norm.bias",
]


def _model_config(backbone, **overrides):
    config = smoke.get_config().model
    config.update(backbone=backbone, width_multiplier=1.0)
    for key, value in overrides.items():
        config[key] = value
    return config


def _backbone(name, **overrides):
    return get_backbone_factory(name)(_model_config(name, **overrides), None, jnp.float32)


def _init(model, image_shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), (2, *image_shape))
    init = jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False)["params"])
    return init(x), x


@pytest.fixture(scope="module")
def vit_test_init():
    """``(params, x)`` of ``vit_test`` (patch 4, 64 wide, 2 blocks, 2 heads) initialised on 2
    images of 32x32x3: compiled once for the tests that read or apply its parameters (their
    shapes do not depend on the image size: the position table is a constant)."""
    model = _backbone("vit_test")
    assert model == VisionTransformer(patch_size=4, embed_dim=64, depth=2, num_heads=2)
    return _init(model, (32, 32, 3))


def _apply(model, params, x):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, x)


def _flat(params):
    return {
        tuple(k.key for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def _official_count(dim, depth, patch, image=224, channels=3, classes=0):
    """timm's ViT as moco-v3's vits.py builds it (mlp_ratio 4, qkv bias), counted by hand."""
    tokens = (image // patch) ** 2 + 1
    norms = 2 * (2 * dim)
    attention = (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    mlp = (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    patch_embed = channels * patch * patch * dim + dim
    head = dim * classes + classes if classes else 0
    return patch_embed + dim + tokens * dim + depth * (norms + attention + mlp) + 2 * dim + head


@pytest.mark.parametrize(
    "name,dim,official,with_head",
    [("vit_small", 384, 21_665_664, 22_050_664), ("vit_base", 768, 85_798_656, 86_567_656)],
)
def test_parameter_counts_match_moco_v3(name, dim, official, with_head):
    assert _official_count(dim, depth=12, patch=16) == official
    assert _official_count(dim, depth=12, patch=16, classes=1000) == with_head
    model = _backbone(name)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
    # pos_embed is a constant here, a frozen nn.Parameter of (1 + 14 * 14) x dim in moco-v3.
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == official - 197 * dim


def _sincos_restated(grid_h, grid_w, dim):
    """build_2d_sincos_position_embedding of moco-v3's vits.py, entry by entry, in float64."""
    quarter = dim // 4
    table = np.zeros((1 + grid_h * grid_w, dim))  # row 0: the CLS token's zeros
    for m in range(grid_h * grid_w):
        # torch.meshgrid(arange(w), arange(h)) ("ij") flattened: entry m is (m // h, m % h).
        w_coord, h_coord = m // grid_h, m % grid_h
        for d in range(quarter):
            frequency = 1.0 / 10000.0 ** (d / quarter)
            table[1 + m, d] = math.sin(w_coord * frequency)
            table[1 + m, quarter + d] = math.cos(w_coord * frequency)
            table[1 + m, 2 * quarter + d] = math.sin(h_coord * frequency)
            table[1 + m, 3 * quarter + d] = math.cos(h_coord * frequency)
    return table[None]


@pytest.mark.parametrize("grid_h,grid_w,dim", [(14, 14, 384), (7, 7, 192), (2, 3, 8)])
def test_sincos_table_matches_moco_v3(grid_h, grid_w, dim):
    table = sincos_position_embedding(grid_h, grid_w, dim)
    assert table.dtype == np.float32 and table.shape == (1, 1 + grid_h * grid_w, dim)
    np.testing.assert_allclose(table, _sincos_restated(grid_h, grid_w, dim), rtol=0, atol=2e-6)


def _assert_uniform(w, bound):
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.97 * bound
    assert np.std(w) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_initialisation_follows_moco_v3(vit_test_init):
    params, _ = vit_test_init  # VisionTransformer(patch_size=4, embed_dim=64, depth=2, heads=2)
    flat = _flat(params)
    dim = 64
    for i in range(2):
        block = f"blocks_{i}"
        # qkv: Xavier of one of q/k/v, sqrt(6 / (64 + 64)), not of the fused 64 x 192 kernel.
        _assert_uniform(flat[(block, "attn", "qkv", "kernel")], math.sqrt(6 / (dim + dim)))
        _assert_uniform(flat[(block, "attn", "proj", "kernel")], math.sqrt(6 / (dim + dim)))
        _assert_uniform(flat[(block, "mlp", "fc1", "kernel")], math.sqrt(6 / (dim + 4 * dim)))
        _assert_uniform(flat[(block, "mlp", "fc2", "kernel")], math.sqrt(6 / (4 * dim + dim)))
    # The patch projection as a Linear of 3 * 4 * 4 inputs (the official's 3 * p * p).
    _assert_uniform(flat[("patch_embed", "proj", "kernel")], math.sqrt(6 / (3 * 16 + dim)))
    for path, value in flat.items():
        if path[-1] == "bias":
            assert not value.any(), path
        if path[-1] == "scale":
            assert (value == 1).all(), path
    cls_token = flat[("cls_token",)]
    assert cls_token.shape == (1, 1, dim)
    assert 0.6e-6 < cls_token.std() < 1.4e-6 and abs(cls_token.mean()) < 0.5e-6


@pytest.mark.parametrize("name,width", [("vit_tiny", 192), ("vit_test", 64)])
@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)])
def test_small_vits_on_small_images(name, width, image_shape):
    model = _backbone(name)
    x = jax.ShapeDtypeStruct((5, *image_shape), jnp.float32)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
    assert out.shape == (5, width) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "size,multiplier,message",
    [
        (30, 1.0, "image size 30x30 is not divisible by the patch size 4"),
        (32, 33 / 64, "width 33 is not divisible by 2 heads"),
        (32, 34 / 64, "divisible by 4 [(]got 34[)]"),  # 2 heads of 17, sin-cos needs 4 | 34
    ],
)
def test_bad_shapes_fail_with_a_message(size, multiplier, message):
    model = _backbone("vit_test", width_multiplier=multiplier)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


@pytest.mark.parametrize("frozen", [False, True])
def test_stop_grad_conv1_freezes_the_patch_projection(frozen, vit_test_init):
    model = _backbone("vit_test", stop_grad_conv1=frozen)
    assert model.stop_grad_conv1 == frozen
    params, _ = vit_test_init  # the same parameters with or without the flag
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=False) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    for path, grad in _flat(grads).items():
        assert grad.any() != (frozen and path[0] == "patch_embed"), path


def test_parameter_paths_are_timm_names(vit_test_init):
    params, _ = vit_test_init
    flat = _flat(params)
    names = [timm_name(path) for path in flat]
    assert sorted(names + ["pos_embed"]) == sorted(EXPECTED_TIMM_KEYS)
    assert all(flax_path(timm_name(path)) == path for path in flat)


def _torch_vit(torch, state, images, depth, heads, patch):
    """timm's VisionTransformer.forward_features (CLS token, no head), re-stated from a state
    dict with torch's functional ops; images ``[N, C, H, W]``."""
    fn = torch.nn.functional

    def linear(x, name):
        return fn.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    def norm(x, name):
        return fn.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)

    x = fn.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state["pos_embed"]
    batch, tokens, dim = x.shape
    for i in range(depth):
        qkv = linear(norm(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv")
        q, k, v = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attention = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + linear(mixed, f"blocks.{i}.attn.proj")
        hidden = fn.gelu(linear(norm(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1"))
        x = x + linear(hidden, f"blocks.{i}.mlp.fc2")
    return norm(x, "norm")[:, 0]


def test_forward_matches_a_torch_restatement_of_timm(vit_test_init):
    """Weights carried over by name and layout (Dense kernels transposed, the conv kernel
    [p, p, C, D] -> [D, C, p, p]); every parameter perturbed so none is trivially 0 or 1."""
    torch = pytest.importorskip("torch")
    model = _backbone("vit_test")
    params, x = vit_test_init
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.2 * rng.standard_normal(p.shape, np.float32), params)
    state = {"pos_embed": torch.tensor(_sincos_restated(8, 8, 64))}
    for path, value in _flat(params).items():
        if path[-1] == "kernel":  # [in, out] -> [out, in]; [p, p, C, D] -> [D, C, p, p]
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
        state[timm_name(path)] = torch.tensor(value, dtype=torch.float64)
    images = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), dtype=torch.float64)
    expected = _torch_vit(torch, state, images, depth=2, heads=2, patch=4).numpy()
    got = _apply(model, params, x)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5)  # 2.4e-6 seen


def test_encoder_in_bfloat16(vit_test_init):
    """build_encoder with a ViT: pooled features of the embedding width, float32 parameters,
    bfloat16 compute close to float32's."""
    config = _model_config("vit_test", head="mlp", dtype="bfloat16")
    model = build_encoder(config)
    backbone, x = vit_test_init
    init = lambda x: model.init(jax.random.key(0), x, train=False)["params"]
    shapes = jax.eval_shape(init, x)  # the parameters as built for bfloat16 compute
    assert shapes["head"]["fc0"]["kernel"].shape == (64, 64)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    assert jax.tree.map(jnp.shape, shapes["backbone"]) == jax.tree.map(jnp.shape, backbone)
    # The head initialised (jitted: the backbone's initialisation is dead code, not compiled).
    params = {"backbone": backbone, "head": jax.jit(lambda x: init(x)["head"])(x)}
    features, embedding = _apply(model, params, x)
    assert features.shape == (2, 64) and embedding.shape == (2, config.dim)
    assert features.dtype == embedding.dtype == jnp.float32
    config.dtype = "float32"
    reference, _ = _apply(build_encoder(config), params, x)
    np.testing.assert_allclose(
        np.asarray(features), np.asarray(reference), rtol=0, atol=0.05
    )  # 0.013 seen
