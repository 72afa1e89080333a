"""``python -m moco_jax.export`` and reading its files back (``init_from`` of a ``.pth``/``.pkl``).

One tiny saved run (smoke.py: ResNet-18 at width 4, no training: random weights, stats and queue,
so every array is distinct) is exported in the three formats; reading each file back must give
exactly the saved arrays. The official formats' rules are written out here independently.
"""

import os
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from abstract_states import abstract_state
from etils import epath

import moco_jax
from moco_jax import export
from moco_jax.interop import formats
from moco_jax.interop.errors import WeightBridgeError
from moco_jax.interop.init_from import load_encoder_weights
from moco_jax.run.checkpointing import Checkpointer
from tests.test_torch_bridge import _Runs, torchvision_resnet_state_shapes
from tests.torch_helpers import moco_checkpoint_to_flax
from tiny import tiny_config

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP, STEPS_PER_EPOCH = 6, 4  # the export's epoch: 6 // 4 = 1 completed epoch
RESNET_FORMATS = ("torchvision", "detectron2", "moco")  # deit is a ViT's (test_torch_bridge_vit)


def _random_state(setup, seed):
    """A state of ``setup`` with random encoders, BN statistics, queue and pointer (v1/v2), built
    from its shapes (no initialisation to compile): every array distinct, so a misplaced one
    shows."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(seed), x.sharding)
        name = jax.tree_util.keystr(path)
        if name.startswith(".opt_state") or not jax.dtypes.issubdtype(x.dtype, np.floating):
            values = np.zeros(x.shape)
        elif "var" in name:
            values = rng.uniform(0.5, 1.5, x.shape)
        else:
            values = rng.standard_normal(x.shape)
        return jax.device_put(values.astype(x.dtype), x.sharding)

    state = jax.tree_util.tree_map_with_path(fill, abstract_state(setup))
    state = state.replace(step=state.step + STEP)
    return state.replace(queue_ptr=state.queue_ptr + 7) if hasattr(state, "queue_ptr") else state


def saved_run(workdir, config, formats, in_memory=()):
    """``(setup, saved state, {format: exported file})`` of a run of ``config`` saved (random
    state, step ``STEP``) in ``workdir`` and exported in each of ``formats``, and in each of
    ``in_memory`` from the state as saved (``export.layout``, without restoring it)."""
    setup = moco_jax.build(config, STEPS_PER_EPOCH, devices=jax.devices()[:1])
    state = _random_state(setup, seed=0)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(epath.Path(workdir) / "checkpoints", config)
    extra = {"epoch_loss_sum": 0.0, "steps_per_epoch": STEPS_PER_EPOCH}
    checkpointer.save(STEP, state, force=True, extra=extra)
    checkpointer.close()
    files = {}
    for fmt in formats:
        files[fmt] = workdir.parent / f"{workdir.name}_{fmt}.weights"
        result = export.export_weights(str(workdir), fmt, str(files[fmt]))
        assert result["step"] == STEP
    for fmt in in_memory:
        files[fmt] = workdir.parent / f"{workdir.name}_{fmt}.weights"
        payload = export.layout(fmt, setup, state, STEP, extra)
        files[fmt].write_bytes(export.encode(fmt, payload))
    return setup, state, files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``(workdir, setup, saved state, {format: exported file})`` of a saved tiny run."""
    workdir = tmp_path_factory.mktemp("run")
    return (workdir, *saved_run(workdir, tiny_config(), RESNET_FORMATS))


def _fresh(setup):
    return _random_state(setup, seed=1)


def _assert_equal(ours, theirs):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, theirs
    )


def _encoder(state):
    return {"params": state.params, "batch_stats": state.batch_stats}


@pytest.mark.parametrize("fmt", RESNET_FORMATS)
def test_export_then_import_is_exact(run, fmt):
    _, setup, saved, files = run
    fresh = _fresh(setup)
    loaded = load_encoder_weights(str(files[fmt]), fresh, setup)
    for collection in ("params", "batch_stats"):
        _assert_equal(
            loaded.__getattribute__(collection)["backbone"], _encoder(saved)[collection]["backbone"]
        )
    # The torchvision layout has no projection head: the head stays as it was.
    head_from = fresh if fmt == "torchvision" else saved
    _assert_equal(loaded.params["head"], head_from.params["head"])
    _assert_equal(loaded.ema_params, loaded.params)  # both encoders start from the file


def test_moco_checkpoint_has_the_official_layout(run):
    _, _, saved, files = run
    checkpoint = torch.load(files["moco"], weights_only=True)
    assert set(checkpoint) == {"epoch", "arch", "state_dict"}
    assert checkpoint["epoch"] == STEP // STEPS_PER_EPOCH and checkpoint["arch"] == "resnet18"
    state_dict = checkpoint["state_dict"]
    queue = state_dict["module.queue"]
    assert queue.shape == (saved.queue.shape[1], saved.queue.shape[0])  # [dim, K]
    assert state_dict["module.queue_ptr"].dtype == torch.int64
    assert state_dict["module.queue_ptr"].tolist() == [int(saved.queue_ptr)]
    arrays = {k: v.numpy() for k, v in state_dict.items()}
    converted = moco_checkpoint_to_flax(arrays)
    _assert_equal(converted["encoder_q"], _encoder(saved))
    _assert_equal(
        converted["encoder_k"], {"params": saved.ema_params, "batch_stats": saved.ema_batch_stats}
    )
    np.testing.assert_array_equal(converted["queue"], np.asarray(saved.queue))
    # The official main_lincls.py rule: encoder_q without its fc is a torchvision ResNet.
    lincls = {
        name[len("module.encoder_q.") :]: value
        for name, value in state_dict.items()
        if name.startswith("module.encoder_q") and not name.startswith("module.encoder_q.fc")
    }
    assert set(lincls) == set(torch.load(files["torchvision"], weights_only=True))


def test_torchvision_export_has_exactly_torchvision_names_and_no_head(run):
    _, _, _, files = run
    state_dict = torch.load(files["torchvision"], weights_only=True)
    expected = torchvision_resnet_state_shapes([2, 2, 2, 2], False, in_channels=1, width=4)
    expected["conv1.weight"] = (4, 1, 3, 3)  # smoke.py's CIFAR stem
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == expected
    assert state_dict["layer2.0.bn1.num_batches_tracked"].dtype == torch.int64


def _official_detectron2_name(name):
    """detection/convert-pretrain-to-detectron2.py's renaming, restated."""
    name = name if "layer" in name else f"stem.{name}"
    name = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"bn(\d)", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def test_detectron2_export_is_what_the_official_converter_writes(run):
    _, _, _, files = run
    with open(files["detectron2"], "rb") as file:
        written = pickle.load(file)
    assert written["__author__"] == "MOCO" and written["matching_heuristics"] is True
    moco = torch.load(files["moco"], weights_only=True)["state_dict"]
    prefix = "module.encoder_q."
    expected = {
        _official_detectron2_name(k[len(prefix) :]): v.numpy()
        for k, v in moco.items()
        if k.startswith(prefix)
    }
    assert list(written["model"]) == list(expected)
    for name, value in expected.items():
        assert isinstance(written["model"][name], np.ndarray)
        np.testing.assert_array_equal(written["model"][name], value, err_msg=name)
    for torch_name, d2_name in [
        ("bn1.running_var", "stem.conv1.norm.running_var"),
        ("layer1.0.bn2.weight", "res2.0.conv2.norm.weight"),
        ("layer3.0.downsample.0.weight", "res4.0.shortcut.weight"),
        ("layer4.0.downsample.1.bias", "res5.0.shortcut.norm.bias"),
        ("fc.weight", "stem.fc.weight"),
    ]:
        assert d2_name in written["model"], torch_name


def _template_file(run, tmp_path, edit):
    """The torchvision export, changed by ``edit(state_dict)``, saved to a new file."""
    _, _, _, files = run
    state_dict = torch.load(files["torchvision"], weights_only=True)
    edit(state_dict)
    path = tmp_path / "edited.pth"
    torch.save(state_dict, path)
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda sd: sd.update({"conv1.weight": torch.zeros(4, 1, 7, 7)}),
            r"conv1\.weight is \[4, 1, 7, 7\] in the file, \[4, 1, 3, 3\] here",
        ),
        (
            lambda sd: sd.pop("layer4.1.bn2.running_var"),
            r"layer4\.1\.bn2\.running_var \[32\] is missing from the file",
        ),
        (
            lambda sd: sd.update({"layer1.2.conv1.weight": torch.zeros(4, 4, 3, 3)}),
            r"the file's layer1\.2\.conv1\.weight \[4, 4, 3, 3\] is not a tensor of it",
        ),
    ],
    ids=["wrong-shape", "missing", "extra-block"],
)
def test_a_file_that_does_not_fit_is_one_line_naming_the_tensor(run, tmp_path, edit, message):
    _, setup, _, _ = run
    path = _template_file(run, tmp_path, edit)
    with pytest.raises(WeightBridgeError, match=message) as error:
        load_encoder_weights(str(path), _fresh(setup), setup)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def _run_export(*args, block_torch=False):
    code = "import sys, runpy; "
    if block_torch:
        code += "sys.modules['torch'] = None; "
    code += f"sys.argv = ['export', *{list(args)!r}]; "
    code += "runpy.run_module('moco_jax.export', run_name='__main__')"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


def test_cli_without_torch_says_how_to_install_it(run, tmp_path):
    workdir, _, _, _ = run
    result = _run_export(
        f"--workdir={workdir}", "--format=moco", f"--output={tmp_path / 'x.pth'}", block_torch=True
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --format=moco needs PyTorch, an optional extra used only at that moment: "
        "pip install torch (the CPU build is enough)"
    )
    assert not (tmp_path / "x.pth").exists()


def test_export_of_a_workdir_without_checkpoints_is_one_line(run, tmp_path):
    workdir, _, _, _ = run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint in .*checkpoints: nothing to export"
    ):
        export.export_weights(str(empty), "detectron2", str(tmp_path / "x.pkl"))


class _BackboneOnly:
    """A set-up whose encoder is a backbone alone, as a linear evaluation's is."""

    def __init__(self, setup):
        self.config = setup.config
        self.algorithm = self

    @staticmethod
    def encoder_variables(state):
        return {k: {"backbone": getattr(state, k)["backbone"]} for k in ("params", "batch_stats")}

    @staticmethod
    def load_encoder(state, variables):
        return variables


@pytest.mark.parametrize("source", ["workdir", "moco", "detectron2"])
def test_a_backbone_only_encoder_takes_the_backbone_without_warning(run, source, caplog):
    workdir, setup, saved, files = run
    path = str(workdir if source == "workdir" else files[source])
    with caplog.at_level("WARNING"):
        loaded = load_encoder_weights(path, _fresh(setup), _BackboneOnly(setup), "pretrained")
    ours = [r for r in caplog.records if "orbax" not in r.pathname]  # not orbax's read-only note
    assert [r.getMessage() for r in ours if r.levelname == "WARNING"] == []
    _assert_equal(loaded, _BackboneOnly.encoder_variables(saved))


@pytest.mark.parametrize(
    "variant", ["under-state_dict", "module-prefix", "imagenet-fc", "pre-1.6-format"]
)
def test_torchvision_state_dict_variants_load(run, tmp_path, variant):
    """As checkpoints are found: inside ``state_dict``, saved from DataParallel (``module.``),
    with torchvision's 1000-class ``fc`` (not a MoCo head: ignored, the head stays fresh), or in
    torch.save's format of before 1.6 (as the official MoCo weights were released)."""
    _, setup, saved, files = run
    state_dict = torch.load(files["torchvision"], weights_only=True)
    if variant == "under-state_dict":
        state_dict = {"state_dict": state_dict, "epoch": 3}
    elif variant == "module-prefix":
        state_dict = {f"module.{k}": v for k, v in state_dict.items()}
    else:
        state_dict.update({"fc.weight": torch.ones(1000, 32), "fc.bias": torch.ones(1000)})
    path = tmp_path / "variant.pth"
    zipped = variant != "pre-1.6-format"
    torch.save(state_dict, path, _use_new_zipfile_serialization=zipped)
    fresh = _fresh(setup)
    loaded = load_encoder_weights(str(path), fresh, setup)
    _assert_equal(loaded.params["backbone"], saved.params["backbone"])
    _assert_equal(loaded.params["head"], fresh.params["head"])


def test_a_linear_classifier_becomes_torchvisions_fc(run):
    _, _, saved, _ = run
    rng = np.random.default_rng(0)
    classifier = {"kernel": rng.standard_normal((32, 10)), "bias": rng.standard_normal(10)}
    backbone = _BackboneOnly.encoder_variables(jax.device_get(saved))
    state_dict = formats.torchvision_state_dict(backbone, classifier)
    assert list(state_dict)[-2:] == ["fc.weight", "fc.bias"]
    np.testing.assert_array_equal(state_dict["fc.weight"], classifier["kernel"].T)
    np.testing.assert_array_equal(state_dict["fc.bias"], classifier["bias"])


def test_cli_writes_detectron2_weights_without_torch(run, tmp_path):
    workdir, _, _, files = run
    output = tmp_path / "model.pkl"
    result = _run_export(
        f"--workdir={workdir}", "--format=detectron2", f"--output={output}", block_torch=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"wrote {output}: detectron2 weights of step 6")
    assert "note: the CIFAR stem" in result.stdout
    assert output.read_bytes() == files["detectron2"].read_bytes()


def test_a_pth_that_runs_code_is_refused_by_init_from(run, tmp_path):
    _, setup, _, _ = run
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save(
        {"epoch": 1, "state_dict": {"conv1.weight": _Runs(os.system, f"touch {marker}")}}, path
    )
    with pytest.raises(WeightBridgeError, match=r"^init_from .*evil\.pth\.tar: not a"):
        load_encoder_weights(str(path), _fresh(setup), setup)
    assert not marker.exists()


def test_the_notes_name_what_the_pytorch_model_must_be_built_like():
    """After an export, a ViT other than moco-v3's ``vit_small``/``vit_base`` gets timm's
    arguments (its width ``models.vit.vit_width``'s), a ResNet with a CIFAR stem or another
    width a note each; moco-v3's ViTs and torchvision's ResNet-50 none."""
    vit = {"model.backbone": "vit_test", "model.width_multiplier": 0.5, "model.cifar_stem": False}
    [note] = export._notes(tiny_config(**vit, **{"dataset.image_size": 16}))
    assert "vit_test is not one of moco-v3's vits.py models" in note
    assert "img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2," in note
    small = tiny_config(**{**vit, "model.backbone": "vit_small"})  # at width 0.5: 192
    assert export._notes(small) == [
        "vit_small is not one of moco-v3's vits.py models: timm's VisionTransformer with "
        f"img_size={small.dataset.image_size}, patch_size=16, in_chans=1, embed_dim=192, "
        "depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True, LayerNorm eps 1e-6 (and MoCo v3's "
        "sin-cos pos_embed)"
    ]
    base = tiny_config(**{**vit, "model.backbone": "vit_base", "model.width_multiplier": 1.0})
    assert export._notes(base) == []
    resnet = {"model.backbone": "resnet50", "model.cifar_stem": True, "model.width_multiplier": 2.0}
    assert export._notes(tiny_config(**resnet)) == [
        "the CIFAR stem (3x3 conv1, no max-pool): torchvision's resnet has 7x7",
        "width_multiplier 2.0: torchvision's resnet has 1",
    ]
    resnet |= {"model.cifar_stem": False, "model.width_multiplier": 1.0}
    assert export._notes(tiny_config(**resnet)) == []
