"""Weight bridge: exact round trips and complete coverage of torchvision / official MoCo names.

The expected names and shapes are written out here from torchvision's ResNet definition
(independently of moco_jax's mapping code), so a wrong or missing mapping fails.
"""

import os
import pickle
import shlex

import jax
import numpy as np
import pytest

from configs import moco_v2_imagenet, smoke
from moco_jax.interop import formats, names_resnet, torch_files
from moco_jax.interop.errors import WeightBridgeError
from moco_jax.models import build_encoder
from tests.torch_helpers import moco_checkpoint_to_flax


def torchvision_resnet_state_shapes(layers, bottleneck, in_channels=3, width=64, head=None):
    """{name: shape} of torchvision's resnet state dict (fc replaced by ``head``)."""
    shapes = {}

    def conv(name, out_c, in_c, k):
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)

    def bn(name, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{leaf}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    conv("conv1", width, in_channels, 7)
    bn("bn1", width)
    expansion = 4 if bottleneck else 1
    inplanes = width
    for stage, blocks in enumerate(layers):
        planes = width * 2**stage
        for b in range(blocks):
            p = f"layer{stage + 1}.{b}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if b == 0 and (stage > 0 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    features = inplanes
    if head == "linear":
        shapes["fc.weight"], shapes["fc.bias"] = (128, features), (128,)
    elif head == "mlp":
        shapes["fc.0.weight"], shapes["fc.0.bias"] = (features, features), (features,)
        shapes["fc.2.weight"], shapes["fc.2.bias"] = (128, features), (128,)
    return shapes


def _random_variables(model_config, image_shape, seed=0):
    model = build_encoder(model_config)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, *image_shape), np.float32), train=False)
    )
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)


def _resnet50_config(head):
    config = moco_v2_imagenet.get_config().model
    config.head = head
    return config


def _assert_trees_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert [p for p, _ in flat_a] == list(flat_b)
    for path, value in flat_a:
        np.testing.assert_array_equal(value, flat_b[path], err_msg=str(path))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_resnet50_state_dict_has_torchvision_names_shapes_and_order(head):
    variables = _random_variables(_resnet50_config(head), (64, 64, 3))
    state_dict = names_resnet.flax_to_torch(variables)
    expected = torchvision_resnet_state_shapes([3, 4, 6, 3], bottleneck=True, head=head)
    assert list(state_dict) == list(expected)  # same names in torchvision's order
    assert {k: v.shape for k, v in state_dict.items()} == expected


def test_cifar_resnet18_names_and_grayscale_input():
    config = smoke.get_config().model
    config.update(width_multiplier=0.25, cifar_stem=True, head="linear")
    state_dict = names_resnet.flax_to_torch(_random_variables(config, (28, 28, 1)))
    expected = torchvision_resnet_state_shapes([2, 2, 2, 2], False, in_channels=1, width=16)
    expected["conv1.weight"] = (16, 1, 3, 3)  # the CIFAR stem
    expected["fc.weight"], expected["fc.bias"] = (config.dim, 128), (config.dim,)
    assert {k: v.shape for k, v in state_dict.items()} == expected


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_round_trip_is_exact_both_ways(head):
    variables = _random_variables(_resnet50_config(head), (64, 64, 3))
    state_dict = names_resnet.flax_to_torch(variables)
    _assert_trees_equal(variables, names_resnet.torch_to_flax(state_dict))
    again = names_resnet.flax_to_torch(names_resnet.torch_to_flax(state_dict))
    assert list(again) == list(state_dict)
    for name, value in state_dict.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_conv_and_dense_layouts_are_transposed_as_torch_expects():
    variables = _random_variables(_resnet50_config("mlp"), (64, 64, 3))
    state_dict = names_resnet.flax_to_torch(variables)
    kernel = variables["params"]["backbone"]["layer2_0"]["conv2"]["kernel"]  # [H, W, I, O]
    np.testing.assert_array_equal(
        state_dict["layer2.0.conv2.weight"][5, 3, 1, 2], kernel[1, 2, 3, 5]
    )
    dense = variables["params"]["head"]["fc2"]["kernel"]  # [in, out]
    np.testing.assert_array_equal(state_dict["fc.2.weight"][7, 11], dense[11, 7])
    stats = variables["batch_stats"]["backbone"]["layer3_0"]["downsample_bn"]
    np.testing.assert_array_equal(state_dict["layer3.0.downsample.1.running_var"], stats["var"])


def test_official_moco_v2_checkpoint_maps_every_tensor():
    """A state dict named exactly like moco_v2_800ep_pretrain.pth.tar's (DataParallel prefix)."""
    expected = torchvision_resnet_state_shapes([3, 4, 6, 3], bottleneck=True, head="mlp")
    rng = np.random.default_rng(1)
    checkpoint = {}
    for encoder in ("encoder_q", "encoder_k"):
        for name, shape in expected.items():
            value = rng.standard_normal(shape).astype(np.float32)
            if name.endswith("num_batches_tracked"):
                value = np.asarray(7, np.int64)
            checkpoint[f"module.{encoder}.{name}"] = value
    checkpoint["module.queue"] = rng.standard_normal((128, 65536)).astype(np.float32)
    checkpoint["module.queue_ptr"] = np.asarray([256], np.int64)

    converted = moco_checkpoint_to_flax(checkpoint)
    template = _random_variables(_resnet50_config("mlp"), (64, 64, 3))
    for encoder in ("encoder_q", "encoder_k"):
        variables = converted[encoder]
        assert jax.tree.structure(variables) == jax.tree.structure(template)
        assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, template)
        back = names_resnet.flax_to_torch(variables, f"module.{encoder}.")
        for name, value in back.items():
            if not name.endswith("num_batches_tracked"):
                np.testing.assert_array_equal(value, checkpoint[name], err_msg=name)
    assert converted["queue"].shape == (65536, 128)
    np.testing.assert_array_equal(converted["queue"], checkpoint["module.queue"].T)
    assert converted["queue_ptr"] == 256

    exported = formats.moco_checkpoint(
        converted["encoder_q"], converted["encoder_k"], converted["queue"], 256, "resnet50", 0
    )["state_dict"]
    assert set(exported) == set(checkpoint)
    np.testing.assert_array_equal(exported["module.queue"], checkpoint["module.queue"])


def test_unknown_tensor_names_are_rejected():
    with pytest.raises(WeightBridgeError, match="no tensor name starts with"):
        names_resnet.torch_to_flax({"conv1.weight": np.zeros((1, 1, 3, 3))}, "module.encoder_q.")
    with pytest.raises(WeightBridgeError, match="unexpected BatchNorm tensor"):
        names_resnet.torch_to_flax({"bn1.gamma": np.zeros(3)})


GOOD = {"conv1.weight": np.zeros((4, 1, 3, 3), np.float32), "bn1.weight": np.ones(4, np.float32)}


@pytest.mark.parametrize(
    "state_dict,message",
    [
        ({**GOOD, 7: np.zeros(3, np.float32)}, r"state dict key 7 is not a tensor name"),
        ({**GOOD, "bn1.bias": "0.5"}, r"'bn1.bias' holds a str, not a tensor"),
        ({**GOOD, "bn1.bias": {"x": np.zeros(4)}}, r"'bn1.bias' holds a dict, not a tensor"),
        (
            {**GOOD, "layer9.0.conv1.weight": np.zeros((4, 4, 3, 3), np.float32)},
            r"'layer9.0.conv1.weight' is not a tensor of a torchvision ResNet",
        ),
        (
            {"conv1.weight": np.zeros((4, 1, 3, 3), np.int64)},
            r"'conv1.weight' has dtype int64; weights must be floating point",
        ),
        (
            {"conv1.weight": np.full((4, 1, 3, 3), np.nan, np.float32)},
            r"'conv1.weight' holds NaN or infinite values",
        ),
    ],
    ids=["int-key", "string-value", "nested-dict", "extra-layer", "int64-weights", "nan-weights"],
)
def test_hostile_state_dicts_are_refused_naming_the_key(state_dict, message):
    with pytest.raises(WeightBridgeError, match=message):
        names_resnet.torch_to_flax(state_dict)


def test_damaged_files_are_named_for_what_they_are(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(4, 1, 3, 3)}, path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightBridgeError, match=r"not a complete PyTorch file"):
        torch_files.load_torch_file(truncated)
    with pytest.raises(WeightBridgeError, match=r"is a directory, not a \.pth file"):
        torch_files.load_torch_file(tmp_path)
    torch.save({"conv1.weight": torch.zeros(4, 1, 3, 3), "epoch": 3}, path)
    with pytest.raises(WeightBridgeError, match=r"'epoch' holds a int, not a tensor"):
        torch_files.load_torch_file(path)


def test_detectron2_names_follow_the_official_converter_and_invert():
    """detection/convert-pretrain-to-detectron2.py's rules on every name of a MoCo v2 ResNet-50."""
    names = torchvision_resnet_state_shapes([3, 4, 6, 3], bottleneck=True, head="mlp")
    table = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.num_batches_tracked": "stem.conv1.norm.num_batches_tracked",
        "layer1.0.bn3.running_mean": "res2.0.conv3.norm.running_mean",
        "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
        "layer4.0.downsample.1.running_var": "res5.0.shortcut.norm.running_var",
        "layer3.5.conv2.weight": "res4.5.conv2.weight",
        "fc.0.bias": "stem.fc.0.bias",
    }
    for torch_name, d2_name in table.items():
        assert formats.detectron2_name(torch_name) == d2_name
    renamed = [formats.detectron2_name(name) for name in names]
    assert len(set(renamed)) == len(names)
    assert [formats.torch_name_from_detectron2(name) for name in renamed] == list(names)
    with pytest.raises(WeightBridgeError, match=r"'res2_0_branch2a_w' is not a name"):
        formats.torch_name_from_detectron2("res2_0_branch2a_w")


class _Runs:
    """Unpickling this calls ``function(argument)``: a malicious weights file's payload."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


@pytest.mark.parametrize("function", [os.system, eval], ids=["os.system", "eval"])
def test_a_plain_pickle_that_runs_code_is_refused(tmp_path, function):
    """A detectron2-style ``.pkl`` whose pickle calls a function is refused; nothing runs."""
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    argument = command if function is os.system else f"__import__('os').system({command!r})"
    payload = {"model": {"stem.conv1.weight": _Runs(function, argument)}, "__author__": "MOCO"}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(WeightBridgeError, match=r"evil\.pkl: not a plain weights file"):
        formats.read_state_dict(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # control: the payload is live
    assert marker.exists()


def test_a_pickle_of_arrays_reads_back(tmp_path):
    model = {"stem.conv1.weight": np.ones((4, 1, 3, 3), np.float32), "res2.0.conv1.norm.bias": 1}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps({"model": model, "__author__": "MOCO"}))
    state_dict, kind = formats.read_state_dict(path)
    assert kind == "a detectron2 pickle" and list(state_dict) == [
        "conv1.weight",
        "layer1.0.bn1.bias",
    ]
    path.write_bytes(pickle.dumps({"model": model})[:-20])
    with pytest.raises(WeightBridgeError, match=r"neither a PyTorch file nor"):
        formats.read_state_dict(path)


def _torchvision():
    """torchvision, or a skip saying why (a build for another torch fails at import)."""
    try:
        import torchvision
    except Exception as err:  # ImportError, or RuntimeError of a mismatched build
        pytest.skip(f"torchvision is not usable here ({type(err).__name__}: {err})")
    return torchvision


def _realistic_variables(model_config, image_shape, seed=0):
    """Variables of the shapes of ``model_config`` with a He-like scale (features stay O(1))
    and non-trivial BN statistics, so every tensor's place matters."""
    shapes = _random_variables(model_config, image_shape, seed)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(x.shape[:-1]))
            return (rng.standard_normal(x.shape) * np.sqrt(1.0 / fan_in)).astype(np.float32)
        if name.endswith("['var']") or name.endswith("['scale']"):
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_loads_into_real_torchvision_with_the_same_features(arch, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = _torchvision()
    config = _resnet50_config("mlp")
    config.backbone = arch
    variables = _realistic_variables(config, (32, 32, 3))
    path = tmp_path / "exported.pth"
    path.write_bytes(torch_files.save_torch_file(formats.torchvision_state_dict(variables)))

    model = getattr(torchvision.models, arch)()
    result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    model.fc = torch.nn.Identity()
    images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    ours, _ = build_encoder(config).apply(variables, images, train=False)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


class _RunsShell:
    """Unpickling this runs a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("nested", [False, True], ids=["bare", "inside_checkpoint"])
def test_load_torch_file_refuses_pickled_code(tmp_path, nested):
    """A ``.pth`` whose pickle calls ``os.system`` is refused and the command never runs."""
    marker = tmp_path / "pwned"
    payload = _RunsShell(f"echo pwned > {shlex.quote(str(marker))}")
    if nested:
        payload = {"epoch": 1, "state_dict": {"module.encoder_q.fc.weight": payload}}
    path = tmp_path / "evil.pth"
    torch = pytest.importorskip("torch")
    torch.save(payload, path)

    with pytest.raises(WeightBridgeError):
        torch_files.load_torch_file(path)
    assert not marker.exists()

    # Control: the payload is live, so the refusal above is what kept the command from running.
    torch.load(path, weights_only=False)
    assert marker.exists()
