"""Compiling a whole run for a TPU slice on this CPU machine (libtpu's compile-only devices)."""

import importlib.util
import json

import pytest

from moco_jax.config.checks import ConfigError
from moco_jax.pod import compile_for, topology
from moco_jax.pod.compile_targets import run_targets
from moco_jax.run import cli_errors

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("libtpu") is None,
        reason="libtpu not installed (pip install -r requirements-tpu.txt)",
    ),
    # The tests' persistent compile cache cannot load compile-only executables back (harmless).
    pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry"),
]


def tiny_config(**changes):
    """The smoke config with the MLP backbone: a compile of seconds for the TPU compiler."""
    from configs.smoke import get_config

    config = get_config()
    config.model.backbone = "mlp"
    config.model.head = "mlp"
    config.dataset.image_size = 28  # the MLP's kNN features see the stored 28x28 images
    config.batch_size = 32
    config.moco.queue_size = 256
    config.augment.jitter_prob = 0.0  # views of seconds fewer to compile; their ops are not read
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        setattr(config[section] if section else config, field, value)
    return config


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "report.json"
    compile_for.main(tiny_config(), "v5e:2x2", str(path))
    return json.loads(path.read_text())


def test_report_has_every_function_of_the_run(report):
    assert report["device_kind"] == "TPU v5 lite" and report["chips"] == 4
    assert report["hbm_bytes_per_chip"] == 16 * 2**30 and report["per_chip_batch"] == 8
    names = [entry["name"] for entry in report["functions"]]
    assert names[0] == "train_step" and names[1].startswith("views")
    assert {"knn features", "knn pixel features", "knn accuracy (head)"} <= set(names)
    for entry in report["functions"]:
        assert entry["fits"] is True
        assert entry["hbm_bytes_per_chip"] == 16 * 2**30
        assert 0 < entry["bytes_per_chip"] < 2**30
        parts = ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes")
        own = sum(entry[k] for k in parts) - entry["alias_bytes"]
        assert entry["bytes_per_chip"] == own + entry["alongside_bytes"]
    step = report["functions"][0]
    assert step["alias_bytes"] > 0  # the state is donated
    assert step["alongside"] == {"train images": 512 * 784 // 4, "test images": 256 * 784 // 4}
    assert step["collectives"]["all-reduce"]["count"] >= 1  # gradients
    assert step["collectives"]["all-to-all"]["count"] == 2  # Shuffle-BN there and back
    assert step["flops_per_chip"] > 0 and step["bound_images_per_sec_per_chip"] > 0


def test_bank_per_chip_shrinks_with_the_slice():
    """The kNN accuracy's bank arguments per device: 1/4 of the bank on 4 chips, 1/16 on 16
    (8192 training images: the whole 60000, to the same effect, compile for tens of seconds)."""
    config = tiny_config(**{"dataset.max_train_examples": 8192, "batch_size": 256})

    def bank_bytes(name):
        target = next(t for t in run_targets(config, topology.topology_devices(name).devices)[1]
                      if t.name == "knn accuracy (head)")  # fmt: skip
        compiled = target.fn.lower(*target.args).compile()
        return compiled.memory_analysis().argument_size_in_bytes

    small, large = bank_bytes("v5e:2x2"), bank_bytes("v5e:4x4")
    # 8192 bank rows of 128 floats + labels (and the test split): a quarter of it per device.
    assert small == pytest.approx(8192 * 129 * 4 / 4, rel=0.25)
    assert large == pytest.approx(small / 4, rel=0.05)


def test_hosts_read_their_share(monkeypatch):
    """v5e:4x4 is 4 hosts of 4 chips: each host reads 1/4 of the split's first 512 examples,
    32 for each of its devices; the test split is padded to 16 a device."""
    devices = topology.topology_devices("v5e:4x4").devices
    config = tiny_config(
        batch_size=128, **{"dataset.max_test_examples": 250, "model.bn_mode": "sync"}
    )
    _, targets = run_targets(config, devices)
    step, views = targets[:2]
    images = views.args[0]
    assert images.shape == (16 * 32, 28, 28, 1)
    assert views.args[1].shape == (32 // 8, 128)  # steps of the epoch x global batch
    assert step.alongside["test images"] == 16 * 28 * 28  # 62 a host: 16 a device, padded


def _step_only(monkeypatch):
    """compile_for compiles the training step only."""
    every = compile_for.run_targets

    def step_only(*args):
        setup, targets = every(*args)
        return setup, targets[:1]

    monkeypatch.setattr(compile_for, "run_targets", step_only)


def test_not_fitting_is_one_line_with_the_largest_batch(report, tmp_path, monkeypatch, capsys):
    """A chip with less HBM than the step needs at 8 images (the tiny step's bytes, minus one):
    exit 2 and one line naming the function, the shortfall and the largest per-chip batch that
    fits (4, found by compiling); the JSON report is written first."""
    needs = report["functions"][0]["bytes_per_chip"]
    monkeypatch.setattr(topology, "HBM_PER_CHIP", (("TPU v5 lite", needs - 1),))
    _step_only(monkeypatch)  # the fixture compiled the rest: the same failure path, faster
    path = tmp_path / "report.json"
    with pytest.raises(SystemExit) as stop:
        cli_errors.run_with_clear_errors(compile_for.main, tiny_config(), "v5e:2x2", str(path))
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: train_step needs"), errors
    assert "0.00 GiB more than a TPU v5 lite chip's" in errors[0]
    assert "the training step fits up to 4 images per chip (--config.batch_size=16)" in errors[0]
    saved = json.loads(path.read_text())
    assert saved["functions"][0]["fits"] is False
    assert saved["training_step_batch"]["largest_per_chip_batch"] == 4
    assert saved["training_step_batch"]["bytes_per_chip_by_batch"]["4"] < needs


def test_shuffle_bn_in_groups_of_8_compiles_for_16_chips(tmp_path, monkeypatch):
    """v5e:4x4 (16 chips, 8 images each; the step only): the default Shuffle-BN group of 8
    devices compiles with the TPU compiler, as two all-to-alls within replica groups of 8, each
    chip sending 7/8 of what it exchanges (one group of 16 would send 15/16)."""
    _step_only(monkeypatch)
    path = tmp_path / "report.json"
    compile_for.main(tiny_config(batch_size=128), "v5e:4x4", str(path))
    (step,) = json.loads(path.read_text())["functions"]
    exchange = step["collectives"]["all-to-all"]
    assert exchange["count"] == 2 and step["fits"] is True
    assert exchange["moved_bytes"] == pytest.approx(exchange["result_bytes"] * 7 / 8)


def test_a_moco_v3_step_compiles_with_gathered_keys_and_no_shuffle(tmp_path, monkeypatch):
    """MoCo v3 for a slice (the step only, as above): no Shuffle-BN all-to-all; the keys
    all-gathered, sync BN's statistics and the gradients all-reduced. (The TPU compiler turns
    some of these tiny all-reduces into all-gathers: 6 all-gathers here, where ViT-S's step at
    512 images per chip has exactly the 2 of k1 and k2, docs/pod_readiness.md.)"""
    _step_only(monkeypatch)
    v3 = {"algorithm": "moco_v3", "model.head": "v3_resnet", "model.bn_mode": "sync"}
    v3 |= {"model.mlp_dim": 16, "optim.name": "lars", "moco.momentum_cosine": True}
    path = tmp_path / "report.json"
    compile_for.main(tiny_config(**v3), "v5e:2x2", str(path))
    (step,) = json.loads(path.read_text())["functions"]
    assert step["name"] == "train_step" and step["fits"] is True
    assert step["collectives"]["all-gather"]["count"] >= 2  # k1 and k2 of every chip
    assert step["collectives"]["all-reduce"]["count"] >= 1  # sync BN, gradients
    assert "all-to-all" not in step["collectives"]
    assert step["flops_per_chip"] > 0


@pytest.mark.parametrize(
    "name,message",
    [
        ("v9:2x2", "is not a TPU topology or h100[:N]"),
        ("v5e", "is not a TPU topology or h100[:N]"),
        ("v5e:3x7", "libtpu has no such topology"),
    ],
)
def test_bad_topology_names(name, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        topology.topology_devices(name)


def test_missing_libtpu_is_named(monkeypatch):
    monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="requirements-tpu.txt"):
        topology.topology_devices("v5e:2x2")


def test_a_program_the_compiler_refuses_does_not_fit():
    """libtpu refuses to compile a program larger than the chip's HBM: that is an entry that
    does not fit, with the compiler's figure, not a crash (the batch search meets it first)."""
    import jax

    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (16.00G) exceeds available HBM (15.75G)."
    )

    class Refused:
        def lower(self, *args):
            return self

        def compile(self):
            raise jax.errors.JaxRuntimeError(message)

    slice_ = topology.topology_devices("v5e:2x2")
    target = compile_for.Target("train_step", Refused(), ())
    entry = compile_for.compile_target(target, slice_)
    assert entry["fits"] is False and entry["bytes_per_chip"] == 16 * 2**30
    assert entry["compile_error"].startswith("RESOURCE_EXHAUSTED")
    assert "DOES NOT FIT" in compile_for._row(entry)


def test_the_environment_is_left_as_it_was(monkeypatch):
    """libtpu's variables are set only while the devices are made: TPU_WORKER_HOSTNAMES left
    behind would make a later train.py (a child process) look for a TPU cluster."""
    import os

    for key in topology.LIBTPU_ENV:
        monkeypatch.delenv(key, raising=False)
    topology.topology_devices("v5e:2x2")
    assert not set(topology.LIBTPU_ENV) & set(os.environ)


def test_a_streamed_dataset_resized_on_the_device_compiles_its_views():
    """``dataset.resize_on="device"``: the views function takes each image's union buffer and
    the two boxes in it, resizes and augments, and compiles for a slice; its FLOPs grow by the
    two matmuls per view (``window_resize``: 2 and 3 bf16 parts), (2 x 28 x 64 x 64 + 3 x 28 x
    28 x 64) x 2 FLOPs x 2 views an image (one channel), and the weights' arithmetic."""
    devices = topology.topology_devices("v5e:2x2").devices
    flops = {}
    for where in ("host", "device"):
        config = tiny_config(
            **{"dataset.name": "imagenet2012", "dataset.resize_on": where},
            **{"dataset.union_buffer": 64},
        )
        views = run_targets(config, devices)[1][1]
        if where == "device":
            assert views.name == "views (host unions, resized, augmented)"
            assert views.args[0].shape == (32, 64, 64, 1) and views.args[1].shape == (32, 2, 4)
        cost = views.fn.lower(*views.args).compile().cost_analysis()
        flops[where] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    per_image = (2 * 28 * 64 * 64 + 3 * 28 * 28 * 64) * 2 * 2
    matmuls = per_image * 32 / 4  # 8 images a chip; the rest: weights, splits, sums
    assert matmuls <= flops["device"] - flops["host"] <= 1.25 * matmuls
