"""Weights of MoCo v3 and the ViT across the PyTorch border: timm's ViT names, moco-v3's heads,
checkpoint and DeiT-format export, both ways, and the errors.

The expected side is the torch restatement of moco-v3 in ``tests/torch_moco_v3.py``
(independent of moco_jax's mapping): its ``MoCoV3ViT`` / ``MoCoV3ResNet`` modules register
their submodules as timm's ViT, torchvision's ResNet and moco-v3's ``_build_mlp`` do, so their
``state_dict()`` gives the official names in the official order, and their forward is the
official computation. Tiny models: ``vit_test`` at half width (32) and ResNet-18 at width 4,
16x16 one-channel images (4x4 patches).
"""

import jax
import numpy as np
import pytest

import moco_jax
from moco_jax import export
from moco_jax.config.checks import ConfigError
from moco_jax.config.defaults import linear_config
from moco_jax.interop import formats, names_encoder, names_vit
from moco_jax.interop.errors import WeightBridgeError
from moco_jax.interop.init_from import load_encoder_weights
from tests.test_export import STEP, _assert_equal, _random_state, saved_run
from tests.torch_helpers import moco_v3_to_flax
from tiny import tiny_config

torch = pytest.importorskip("torch")
import torch_moco_v3 as ref  # noqa: E402

DIM, DEPTH, HEADS, PATCH, IMAGE, MLP_DIM, OUT_DIM = 32, 2, 2, 4, 16, 24, 8
V3 = {"algorithm": "moco_v3", "model.bn_mode": "sync", "model.mlp_dim": MLP_DIM}
V3 |= {"model.dim": OUT_DIM}
VIT = {**V3, "model.backbone": "vit_test", "model.width_multiplier": 0.5}
VIT |= {"model.head": "v3_vit", "model.cifar_stem": False, "optim.name": "adamw"}
RESNET = {**V3, "model.head": "v3_resnet", "optim.name": "lars"}


def official_vit(image=IMAGE, channels=1, dim=DIM, depth=DEPTH, heads=HEADS, patch=PATCH):
    """moco-v3's ``MoCo_ViT`` on ``vits.py``'s ViT."""
    backbone = ref.VisionTransformer(image, patch, channels, dim, depth, heads, False)
    return ref.MoCoV3ViT(backbone, OUT_DIM, MLP_DIM, 1.0, 1)


def official_resnet():
    """moco-v3's ``MoCo_ResNet`` on ResNet-18 at width 4 with the CIFAR stem."""
    return ref.MoCoV3ResNet(ref.CifarResNet((2, 2, 2, 2), 1, 4), OUT_DIM, MLP_DIM, 1.0, 1)


def official_state_dict(model):
    """``model.state_dict()`` as main_moco.py saves it (DistributedDataParallel's ``module.``)."""
    return {f"module.{name}": value for name, value in model.state_dict().items()}


def features_and_projection(encoder, images):
    """A torch ViT base encoder's CLS feature (the projector's input) and projection."""
    seen = []
    hook = encoder.head.register_forward_hook(lambda _, inputs, __: seen.append(inputs[0]))
    with torch.no_grad():
        projection = encoder(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    hook.remove()
    return seen[0], projection


def randomised(module, seed):
    """``module`` with every float tensor random (BN variances positive; pos_embed kept), in
    eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not name.endswith("pos_embed"):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
                if "running_var" in name:
                    tensor.abs_().add_(0.5)
    return module.eval()


# --- Fixtures: the Flax side. ---


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """``(workdir, setup, saved state, files)`` of a saved tiny v3 ViT run: deit exported from
    the workdir, moco from the state in memory (restoring takes a second each)."""
    workdir = tmp_path_factory.mktemp("vit")
    return (workdir, *saved_run(workdir, tiny_config(**VIT), ("deit",), ("moco",)))


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """The same of a v3 ResNet-18 (width 4): moco from the workdir; torchvision, detectron2
    from the state in memory."""
    workdir = tmp_path_factory.mktemp("resnet")
    in_memory = ("torchvision", "detectron2")
    return (workdir, *saved_run(workdir, tiny_config(**RESNET), ("moco",), in_memory))


@pytest.fixture(scope="module")
def apply(vit_run):
    """The ViT encoder's apply, compiled once (eagerly, each op compiles on its own)."""
    return jax.jit(vit_run[1].algorithm.model.apply, static_argnames="train")


def _encoder(state):
    return {"params": state.params, "batch_stats": state.batch_stats}


def _base(state):
    return {k: {p: getattr(state, k)[p] for p in ("backbone", "head") if p in getattr(state, k)}
            for k in ("params", "batch_stats")}  # fmt: skip


def _shapes(state_dict):
    return {name: tuple(value.shape) for name, value in state_dict.items()}


# --- Names, shapes, order; round trips. ---


def test_vit_small_has_timms_names_shapes_and_order():
    """moco-v3's vit_small at 224x224 (abstract: no weights computed) with the v3_vit projector."""
    from moco_jax.models import build_encoder

    config = tiny_config(**{**VIT, "model.backbone": "vit_small", "model.width_multiplier": 1})
    abstract = jax.eval_shape(
        lambda: build_encoder(config.model).init(
            jax.random.key(0), np.zeros((1, 224, 224, 3)), train=False
        )
    )
    variables = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
    state_dict = names_encoder.encoder_to_torch(variables, 224)
    with torch.device("meta"):
        expected = official_vit(224, 3, 384, 12, 12, 16).base_encoder.state_dict()
    assert list(state_dict) == list(expected)
    assert _shapes(state_dict) == _shapes(expected)
    assert state_dict["head.7.num_batches_tracked"].dtype == np.int64
    assert "head.7.weight" not in state_dict  # the last BN has no affine


def test_vit_round_trip_is_exact_both_ways(vit_run):
    _, _, saved, _ = vit_run
    encoder = jax.device_get(_base(saved))
    state_dict = names_encoder.encoder_to_torch(encoder, IMAGE)
    _assert_equal(names_encoder.torch_to_encoder(state_dict), encoder)
    again = names_encoder.encoder_to_torch(names_encoder.torch_to_encoder(state_dict), IMAGE)
    assert list(again) == list(state_dict)
    for name, value in state_dict.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    kernel = encoder["params"]["backbone"]["patch_embed"]["proj"]["kernel"]  # [p, p, C, D]
    np.testing.assert_array_equal(
        state_dict["patch_embed.proj.weight"][5, 0, 1, 3], kernel[1, 3, 0, 5]
    )
    table = ref.sincos_table(IMAGE // PATCH, DIM).numpy()  # numpy's and torch's sin: 1 ulp apart
    np.testing.assert_allclose(state_dict["pos_embed"], table, rtol=0, atol=1e-6)


def test_exported_vit_computes_what_the_torch_model_computes(vit_run, apply):
    """The exported state dict loads strictly into the torch base encoder; same features and
    projections (BN in eval mode) as the Flax encoder."""
    _, _, saved, _ = vit_run
    encoder = jax.device_get(_base(saved))
    model = official_vit().base_encoder.eval()
    state_dict = names_encoder.encoder_to_torch(encoder, IMAGE)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    images = np.random.default_rng(0).standard_normal((3, IMAGE, IMAGE, 1)).astype(np.float32)
    ours = apply(encoder, images, train=False)
    for a, b in zip(ours, features_and_projection(model, images), strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-4, atol=1e-4)


def test_official_v3_checkpoint_loads_with_the_same_features(vit_run, apply, tmp_path):
    """A moco-v3 checkpoint made in torch (optimizer and scaler state included) -> init_from:
    the base encoder computes what the torch model does; the predictor names map both ways."""
    _, setup, _, _ = vit_run
    model = randomised(official_vit(), 1)  # base and momentum encoders differ
    state_dict = official_state_dict(model)
    path = tmp_path / "checkpoint_0099.pth.tar"
    optimizer = torch.optim.AdamW(model.parameters()).state_dict()
    payload = {"epoch": 100, "arch": "vit_test", "state_dict": state_dict}
    torch.save(payload | {"optimizer": optimizer, "scaler": {"scale": 2.0**16}}, path)
    loaded = load_encoder_weights(str(path), _random_state(setup, 5), setup)
    images = np.random.default_rng(1).standard_normal((3, IMAGE, IMAGE, 1)).astype(np.float32)
    ours = apply(jax.device_get(_base(loaded)), images, train=False)  # compiled for numpy
    theirs = features_and_projection(model.base_encoder, images)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-4, atol=1e-4)
    _assert_equal(loaded.ema_params, _base(loaded)["params"])  # the file's momentum: unused
    arrays = {k: v.numpy() for k, v in state_dict.items()}
    converted = moco_v3_to_flax(arrays)
    back = formats.moco_v3_checkpoint(
        converted["base_encoder"], converted["momentum_encoder"], converted["predictor"],
        IMAGE, "vit_test", 100,
    )["state_dict"]  # fmt: skip
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        ulp = 1e-6 if name.endswith("pos_embed") else 0  # written from numpy's sin and cos
        np.testing.assert_allclose(back[name], value, rtol=0, atol=ulp, err_msg=name)


# --- Export of v3 workdirs and re-import. ---


def _official_layout(path, saved, arch, official_model):
    """The moco-v3 checkpoint at ``path``: its layout, names and shapes those of
    ``official_model()``'s state dict, its arrays those of the saved run; returns them."""
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint) == {"epoch", "arch", "state_dict"}
    assert checkpoint["arch"] == arch and checkpoint["epoch"] == 1  # 6 steps at 4 per epoch
    arrays = {k: v.numpy() for k, v in checkpoint["state_dict"].items()}
    converted = moco_v3_to_flax(arrays)
    _assert_equal(converted["base_encoder"], _base(saved))
    momentum = {"params": saved.ema_params, "batch_stats": saved.ema_batch_stats}
    _assert_equal(converted["momentum_encoder"], momentum)
    predictor = {k: getattr(saved, k)["predictor"] for k in ("params", "batch_stats")}
    _assert_equal(converted["predictor"], predictor)
    with torch.device("meta"):
        expected = official_state_dict(official_model())
    assert list(arrays) == list(expected) and _shapes(arrays) == _shapes(expected)
    return arrays


def test_vit_moco_and_deit_exports_have_the_official_layouts(vit_run):
    _, _, saved, files = vit_run
    arrays = _official_layout(files["moco"], saved, "vit_test", official_vit)
    # convert_to_deit.py's rule: the base encoder without its head, under 'model'.
    deit = torch.load(files["deit"], weights_only=True)
    prefix = "module.base_encoder."
    rule = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    rule = {k: v for k, v in rule.items() if not k.startswith("head")}
    assert set(deit) == {"model"} and list(deit["model"]) == list(rule)
    for name, value in rule.items():
        np.testing.assert_array_equal(deit["model"][name].numpy(), value, err_msg=name)


def test_resnet_moco_export_has_the_official_layout(resnet_run):
    _, _, saved, files = resnet_run
    arrays = _official_layout(files["moco"], saved, "resnet18", official_resnet)
    # main_lincls.py's rule: base_encoder without fc is the torchvision export.
    lincls = {k for k in arrays if k.startswith("module.base_encoder.") and ".fc." not in k}
    torchvision = torch.load(files["torchvision"], weights_only=True)
    assert {k[len("module.base_encoder.") :] for k in lincls} == set(torchvision)


@pytest.mark.parametrize(
    "which,source", [("vit", "moco"), ("vit", "deit"), ("vit", "bare"), ("vit", "workdir"),
                     ("resnet", "moco"), ("resnet", "torchvision"), ("resnet", "detectron2")],
)  # fmt: skip
def test_export_then_import_is_exact(vit_run, resnet_run, tmp_path, which, source):
    workdir, setup, saved, files = vit_run if which == "vit" else resnet_run
    path = workdir if source == "workdir" else files.get(source)
    if source == "bare":  # a timm state dict saved from DataParallel
        model = torch.load(files["deit"], weights_only=True)["model"]
        path = tmp_path / "bare.pth"
        torch.save({f"module.{k}": v for k, v in model.items()}, path)
    fresh = _random_state(setup, seed=1)
    loaded = load_encoder_weights(str(path), fresh, setup)
    with_head = source in ("moco", "workdir", "detectron2")
    expected = _base(saved if with_head else fresh)
    expected["params"]["backbone"] = saved.params["backbone"]
    if "backbone" in saved.batch_stats:
        expected["batch_stats"]["backbone"] = saved.batch_stats["backbone"]
    _assert_equal(_base(loaded), expected)
    _assert_equal(loaded.params["predictor"], fresh.params["predictor"])


# --- Errors. ---


@pytest.mark.parametrize(
    "fmt,which,message",
    [
        ("deit", "resnet", r"--format=deit is timm's ViT layout, but .*'s backbone is resnet18"),
        ("torchvision", "vit", r"--format=torchvision is a ResNet layout, but .* ViT vit_test"),
        ("detectron2", "vit", r"--format=detectron2 is a ResNet layout, but .* ViT vit_test"),
    ],
)
def test_formats_that_do_not_apply_are_refused(vit_run, resnet_run, tmp_path, fmt, which, message):
    workdir = (vit_run if which == "vit" else resnet_run)[0]
    with pytest.raises(ConfigError, match=message) as error:
        export.export_weights(str(workdir), fmt, str(tmp_path / "x.pth"))
    assert "\n" not in str(error.value) and not (tmp_path / "x.pth").exists()


def _deit_edited(vit_run, tmp_path, edit):
    state_dict = torch.load(vit_run[3]["deit"], weights_only=True)["model"]
    edit(state_dict)
    path = tmp_path / "edited.pth"
    torch.save({"model": state_dict}, path)
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.update(cls_token=torch.zeros(1, 1, 64)),
         r"cls_token is \[1, 1, 64\] in the file, \[1, 1, 32\] here$"),
        (lambda sd: sd.update({"patch_embed.proj.weight": torch.zeros(32, 1, 8, 8)}),
         r"\(vit_test, width 32, patch 4, image size 16\): patch_embed\.proj\.weight is "
         r"\[32, 1, 8, 8\] in the file, \[32, 1, 4, 4\] here"),
        (lambda sd: sd.update(pos_embed=ref.sincos_table(8, 32)),
         r"pos_embed is \[1, 65, 32\] in the file, \[1, 17, 32\] here"),
        (lambda sd: sd.update(pos_embed=0.02 * torch.randn(1, 17, 32)),
         r"'pos_embed' is not MoCo v3's fixed 2-D sin-cos position embedding of a 4x4 grid"),
        (lambda sd: sd.update({"blocks.2.norm1.weight": torch.ones(32)}),
         r"the file's blocks\.2\.norm1\.weight \[32\] is not a tensor of it"),
        (lambda sd: sd.update({"blocks.0.attn.q.weight": torch.ones(32, 32)}),
         r"'blocks\.0\.attn\.q\.weight' is not a tensor of MoCo v3's \(timm's\) ViT"),
    ],
    ids=["width", "patch", "image-size", "learned-pos-embed", "depth", "unknown-name"],
)  # fmt: skip
def test_a_vit_file_that_does_not_fit_is_one_line(vit_run, tmp_path, edit, message):
    _, setup, _, _ = vit_run
    path = _deit_edited(vit_run, tmp_path, edit)
    with pytest.raises(WeightBridgeError, match=message) as error:
        load_encoder_weights(str(path), _random_state(setup, 1), setup)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_the_other_architecture_is_named(vit_run, resnet_run):
    (_, vit_setup, _, vit_files), (_, resnet_setup, _, resnet_files) = vit_run, resnet_run
    with pytest.raises(WeightBridgeError, match=r"holds a ViT \(timm's names\), but "
                       r"this config's backbone resnet18 is a ResNet$"):  # fmt: skip
        load_encoder_weights(str(vit_files["deit"]), _random_state(resnet_setup, 1), resnet_setup)
    with pytest.raises(WeightBridgeError, match=r"holds a ResNet \(torchvision's "
                       r"names\), but this config's backbone vit_test is a ViT$"):  # fmt: skip
        load_encoder_weights(str(resnet_files["moco"]), _random_state(vit_setup, 1), vit_setup)


def test_a_learned_pos_embed_is_refused_by_the_converter():
    with pytest.raises(WeightBridgeError, match=r"has 15 patch rows: not a square"):
        names_vit.check_pos_embed("pos_embed", np.zeros((1, 16, 8), np.float32))
    names_vit.check_pos_embed("pos_embed", ref.sincos_table(3, 8).numpy())  # the table passes


@pytest.mark.parametrize("which,source", [("vit", "moco"), ("vit", "deit"), ("resnet", "moco")])
def test_linear_evaluation_takes_the_backbone_and_exports_its_classifier(
    vit_run, resnet_run, which, source
):
    """``linear.pretrained`` of a moco-v3 or DeiT file: the backbone, bit for bit; the linear
    run's deit / torchvision export has its classifier as ``head`` / ``fc``."""
    _, _, saved, files = vit_run if which == "vit" else resnet_run
    config, pretraining = linear_config(), tiny_config(**(VIT if which == "vit" else RESNET))
    config.dataset, config.model = pretraining.dataset, pretraining.model
    config.model.head, config.linear.num_classes, config.batch_size = "mlp", 10, 16
    setup = moco_jax.build(config, 4, devices=jax.devices()[:1])
    path = str(files[source])
    loaded = load_encoder_weights(path, _random_state(setup, 1), setup, "linear.pretrained")
    _assert_equal(loaded.params["backbone"], saved.params["backbone"])
    fmt, key = ("deit", "head") if which == "vit" else ("torchvision", "fc")
    payload = export.layout(fmt, setup, loaded, STEP, {})
    state_dict = payload["model"] if fmt == "deit" else payload
    classifier = loaded.params["classifier"]
    np.testing.assert_array_equal(state_dict[f"{key}.weight"], np.asarray(classifier["kernel"]).T)
    np.testing.assert_array_equal(state_dict[f"{key}.bias"], classifier["bias"])


def test_a_moco_v2_vit_exports_and_loads_with_timms_names(tmp_path):
    """A v1/v2 run on a ViT: the moco layout holds both encoders with timm's names, the MLP
    head as ``head.0`` / ``head.2``; init_from of it gives back the query encoder."""
    config = tiny_config(**{"model.backbone": "vit_test", "model.cifar_stem": False})
    config.model.head, config.model.width_multiplier = "mlp", 0.5
    setup = moco_jax.build(config, 4, devices=jax.devices()[:1])
    saved = _random_state(setup, 0)
    payload = export.layout("moco", setup, saved, STEP, {})
    names = list(payload["state_dict"])
    assert names[:2] == ["module.encoder_q.cls_token", "module.encoder_q.pos_embed"]
    assert "module.encoder_k.head.2.bias" in names and names[-2:] == [
        "module.queue",
        "module.queue_ptr",
    ]
    path = tmp_path / "v2_vit.pth.tar"
    path.write_bytes(export.encode("moco", payload))
    loaded = load_encoder_weights(str(path), _random_state(setup, 1), setup)
    _assert_equal(_base(loaded), _base(saved))
