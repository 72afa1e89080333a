"""The backbone a PyTorch file holds (``moco_jax.interop.architecture``), as linear
evaluation of a ``.pth`` takes it: from names and shapes written out independently
(torchvision's ResNet in ``test_torch_bridge``, the torch restatement of moco-v3's ViT in
``torch_moco_v3``)."""

import numpy as np
import pytest

from moco_jax.config.defaults import linear_config
from moco_jax.interop.architecture import backbone_fields
from moco_jax.run.linear_eval import with_pretrained
from tests.test_torch_bridge import torchvision_resnet_state_shapes


def _zeros(shapes):
    """{name: a zero array of the shape}, without the memory of one."""
    return {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}


def _resnet(layers, bottleneck, width=64, stem=7, head=None):
    shapes = torchvision_resnet_state_shapes(layers, bottleneck, width=width, head=head)
    shapes["conv1.weight"] = (width, 3, stem, stem)
    return _zeros(shapes)


@pytest.mark.parametrize(
    "named,expected",
    [
        (_resnet([3, 4, 6, 3], True, head="mlp"), ("resnet50", 1.0, False)),
        (_resnet([3, 4, 6, 3], False), ("resnet34", 1.0, False)),
        (_resnet([2, 2, 2, 2], False, width=16, stem=3), ("resnet18", 0.25, True)),
    ],
    ids=["resnet50-moco-v2", "resnet34", "resnet18-width-16-cifar"],
)
def test_a_torchvision_resnet_is_named_with_its_width_and_stem(named, expected):
    fields = backbone_fields(named, "vit_small")
    assert (fields["backbone"], fields["width_multiplier"], fields["cifar_stem"]) == expected


def test_a_resnet_we_do_not_register_leaves_the_config_alone():
    assert backbone_fields(_resnet([1, 1, 1, 1], False), "resnet18") == {}
    assert backbone_fields({"features.0.weight": np.zeros((8, 3, 3, 3))}, "resnet18") == {}
    odd = _resnet([2, 2, 2, 2], False)
    odd["conv1.weight"] = np.float32(1)  # not a convolution kernel: for the loader to name
    assert backbone_fields(odd, "resnet18") == {}


def _vit(dim, depth, patch, image=32, heads=2):
    ref = pytest.importorskip("torch_moco_v3")
    model = ref.VisionTransformer(image, patch, 3, dim, depth, heads, False)
    return _zeros({name: tuple(value.shape) for name, value in model.state_dict().items()})


@pytest.mark.parametrize(
    "dim,depth,patch,current,expected",
    [
        (384, 12, 16, "resnet50", ("vit_small", 1.0)),  # ViT-S/16, moco-v3's vit_small
        (768, 12, 16, "resnet50", ("vit_base", 1.0)),
        (64, 4, 4, "resnet18", ("vit_mini", 1.0)),
        (32, 2, 4, "resnet18", ("vit_test", 0.5)),
        (192, 12, 16, "resnet50", ("vit_small", 0.5)),  # no ViT is 192 wide at patch 16
        (192, 12, 16, "vit_base", ("vit_base", 0.25)),  # ... the config's backbone wins the tie
        (96, 12, 16, "resnet50", ("vit_small", 0.25)),  # 96 / 12 heads; vit_base's 12 as well
    ],
)
def test_a_timm_vit_is_named_by_patch_and_depth_and_its_width(dim, depth, patch, current, expected):
    fields = backbone_fields(_vit(dim, depth, patch, image=2 * patch), current)
    assert (fields["backbone"], fields["width_multiplier"], fields["cifar_stem"]) == (
        *expected,
        False,
    )


def test_a_vit_whose_width_the_heads_do_not_split_is_not_named():
    """Patch 4, depth 12 is vit_tiny's shape, but its 3 heads cannot split 256 channels."""
    assert backbone_fields(_vit(256, 12, 4, image=8), "resnet18") == {}
    assert backbone_fields(_vit(192, 12, 4, image=8), "resnet18")["backbone"] == "vit_tiny"


def test_linear_evaluation_of_a_moco_v3_file_takes_its_backbone(tmp_path):
    """``linear.pretrained`` = a moco-v3 checkpoint made in torch: the linear config (ResNet-50 by
    default) gets the file's ViT; a file that is not a torch file changes nothing."""
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("torch_moco_v3")
    backbone = ref.VisionTransformer(16, 4, 1, 32, 2, 2, False)
    model = ref.MoCoV3ViT(backbone, 8, 24, 1.0, 1)
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "vit_test", "state_dict": state_dict}, path)
    config = with_pretrained(linear_config(), str(path))
    assert config.init_from == str(path)
    model_fields = config.model.backbone, config.model.width_multiplier, config.model.cifar_stem
    assert model_fields == ("vit_test", 0.5, False)
    other = tmp_path / "notes.txt"
    other.write_text("not weights")
    config = with_pretrained(linear_config(), str(other))
    assert config.model.backbone == linear_config().model.backbone
    numbered = tmp_path / "numbered.pth"  # keys that are no names: for the loader to refuse
    torch.save({0: torch.zeros(1), "conv1.weight": torch.zeros(8, 3, 7, 7)}, numbered)
    assert with_pretrained(linear_config(), str(numbered)).model.backbone == "resnet50"


def test_a_file_inside_a_workdir_is_read_for_its_own_backbone(tmp_path):
    """A .pth exported into (or kept beside) a pretraining workdir: the file decides, not the
    workdir's config.json (a workdir, its checkpoints or a step directory: the run's config)."""
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("torch_moco_v3")
    (tmp_path / "config.json").write_text("{}")  # would fail as a run's config: not read
    path = tmp_path / "vit.pth"
    torch.save(ref.VisionTransformer(16, 4, 1, 64, 4, 2, False).state_dict(), path)
    assert with_pretrained(linear_config(), str(path)).model.backbone == "vit_mini"
