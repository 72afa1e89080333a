"""Backbones: torchvision's parameter counts, shapes, the registry and the width multiplier."""

import jax
import numpy as np
import pytest

from configs import smoke
from moco_jax.models import available_backbones, build_encoder, register_backbone
from moco_jax.models.mlp import MLPBackbone


def _param_count(model_config, image_shape):
    model = build_encoder(model_config)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, *image_shape), np.float32), train=False)
    )
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


# torchvision's counts (fc to 1000 classes) with the 1000-way fc swapped for a 128-d linear head:
# total - (F * 1000 + 1000) + (F * 128 + 128).
@pytest.mark.parametrize(
    "backbone,torchvision_total,features",
    [("resnet18", 11_689_512, 512), ("resnet34", 21_797_672, 512), ("resnet50", 25_557_032, 2048)],
)
def test_parameter_counts_match_torchvision(backbone, torchvision_total, features):
    config = smoke.get_config().model
    config.update(backbone=backbone, width_multiplier=1.0, cifar_stem=False, dim=128)
    expected = torchvision_total - (features * 1000 + 1000) + (features * 128 + 128)
    assert _param_count(config, (64, 64, 3)) == expected


def test_reference_recipe_model_has_716400_parameters():
    """docs/reference_runs.md: CIFAR-stem ResNet-18, width 16, 1 channel, linear head: 716,400."""
    config = smoke.get_config().model
    config.update(backbone="resnet18", width_multiplier=0.25, cifar_stem=True, head="linear")
    assert _param_count(config, (28, 28, 1)) == 716_400


def test_mlp_head_hidden_width_equals_feature_width():
    config = smoke.get_config().model
    config.update(backbone="resnet50", width_multiplier=1.0, head="mlp", dim=128)
    model = build_encoder(config)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), train=False)
    )
    head = variables["params"]["head"]
    assert head["fc0"]["kernel"].shape == (2048, 2048)
    assert head["fc2"]["kernel"].shape == (2048, 128)


@pytest.mark.parametrize("cifar_stem,size,spatial", [(True, 16, 16), (False, 64, 16)])
def test_stem_resolution(cifar_stem, size, spatial):
    """The CIFAR stem keeps the resolution; the ImageNet stem divides it by 4 (conv/2 + pool/2)."""
    config = smoke.get_config().model
    config.update(cifar_stem=cifar_stem)
    model = build_encoder(config)
    x = np.zeros((2, size, size, 1), np.float32)

    def bn1_output():  # shapes only (eval_shape): nothing of the ResNet is compiled or run
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(
            variables,
            x,
            train=False,
            capture_intermediates=lambda mdl, _: mdl.name == "bn1" and mdl.path[-2] == "backbone",
            mutable=["intermediates"],
        )
        return state["intermediates"]

    (bn1_out,) = jax.tree.leaves(jax.eval_shape(bn1_output))
    if not cifar_stem:  # max-pool follows bn1 in the ImageNet stem
        spatial *= 2
    assert bn1_out.shape[1:3] == (spatial, spatial)


def test_registry_accepts_a_new_backbone_and_rejects_unknown_names():
    @register_backbone("test_tiny_mlp")
    def _tiny(model_config, norm, dtype):
        return MLPBackbone(width=3, norm=norm, dtype=dtype)

    assert "test_tiny_mlp" in available_backbones()
    config = smoke.get_config().model
    config.backbone = "test_tiny_mlp"
    assert _param_count(config, (4, 4, 1)) == 16 * 3 + 2 * 3 + 3 * config.dim + config.dim
    config.backbone = "resnet1000"
    with pytest.raises(ValueError, match="unknown backbone 'resnet1000'"):
        build_encoder(config)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18")(_tiny)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_grouped_batch_norm_matches_numpy_even_when_the_mean_dwarfs_the_spread(offset):
    """One-pass statistics against a float64 two-pass NumPy BN: a mean of 1000 over a spread of
    0.5 must not cancel the variance away (unshifted float32 E[x^2] - E[x]^2 is off by ~25%)."""
    from moco_jax.models.batch_norm import BatchNorm

    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal((8, 5, 5, 3)) * np.array([0.5, 1.0, 2.0])).astype(np.float32)
    bn = BatchNorm(group_size=4)  # two groups: sample i in group i % 2
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])

    groups = x.astype(np.float64).reshape(4, 2, 25, 3)
    mean, var = groups.mean(axis=(0, 2)), groups.var(axis=(0, 2))
    normalised = (groups - mean[None, :, None]) / np.sqrt(var + 1e-5)[None, :, None]
    expected = normalised.reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-3 if offset else 1e-5)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean.mean(axis=0), rtol=1e-5)
    unbiased = var * 100 / 99
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * unbiased.mean(axis=0), rtol=1e-4)
