"""``python -m benchmarks``: it runs on the tiny preset and its JSON has every field; the
properties it reports hold for the step (Shuffle-BN bytes on 8 devices, donated state, no host
transfers inside the loop, bf16 compute with float32 state). No test asserts a speed."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import __main__ as cli
from benchmarks import compiled as compiled_info
from benchmarks.collectives import abstract_images
from benchmarks.floor import collect_matmuls, floor_pairs, xla_floor
from benchmarks.inputs import SyntheticViews
from benchmarks.presets import STEPS_PER_EPOCH, Options, resolve_config
from tiny import setup, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

HAVE_TORCH = importlib.util.find_spec("torch") is not None

F32 = np.dtype("float32")
SUMMARY_FIELDS = {"images_per_sec", "step_ms", "mfu", "xla_flops_utilization"}
IPS_FIELDS = {"median", "min", "max", "spread", "per_repeat"}
REQUIRED = {
    "": {
        "schema_version",
        "preset",
        "backend",
        "device_kind",
        "num_devices",
        "jax_version",
        "dtype",
        "global_batch",
        "per_device_batch",
        "image_shape",
        "model",
        "run",
        "config",
        "compile",
        "memory",
        "flops",
        "donation",
        "variants",
        "transfer_guard",
        "floor",
        "torch",
        "loss_check",
        "collectives",
        "phase_seconds",
    },
    "compile": {"step_trace_s", "step_lower_s", "step_compile_s", "augment_compile_s"},
    "memory": {
        "argument_bytes",
        "output_bytes",
        "alias_bytes",
        "temp_bytes",
        "peak_bytes_estimate",
        "peak_bytes_method",
        "device_peak_bytes_in_use",
    },
    "flops": {
        "xla_flops_per_step_per_device",
        "xla_flops_per_image",
        "model_flops_per_image",
        "encoder_forward_flops_per_image",
        "peak_flops_per_device",
        "peak_flops_source",
    },
    "donation": {"state_leaves", "donated_leaves", "all_donated"},
    "loss_check": {
        "steps",
        "float32",
        "bfloat16",
        "float32_other_seed",
        "bf16_vs_fp32_max_abs_diff",
        "fp32_seed_max_abs_diff",
        "within_noise",
    },
    "collectives": {
        "num_devices",
        "by_kind",
        "by_payload",
        "total_moved_bytes",
        "shuffle_images_all_to_all_bytes",
        "gather_all_images_bytes",
        "shuffle_over_gather",
    },
}
TORCH_FIELDS = {"torch_version", "device", "images_per_sec", "jax_over_torch", "channels_last"}


@pytest.fixture(scope="module", autouse=True)
def rbg_keys():
    """Keys made here (initial weights, augmentation keys) are rbg's: XLA:CPU compiles threefry
    for ~2 s per random parameter, rbg in a fraction; no field checked here depends on it."""
    with jax.default_prng_impl("unsafe_rbg"):
        yield


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One short run of the tiny preset on the 8 fake devices, through the CLI; no XLA floor
    (compiling each of the step's ~40 distinct convolutions alone would double the test's time;
    ``test_xla_floor_times_each_distinct_op`` covers it on a small case)."""
    path = tmp_path_factory.mktemp("benchmark") / "tiny.json"
    argv = ["--preset", "tiny", "--steps", "1", "--repeats", "2", "--warmup", "1"]
    argv += ["--loss_steps", "2", "--nofloor", "--json", str(path)]
    if HAVE_TORCH:
        argv += ["--torch", "--torch_threads", "1"]
    assert cli.main(argv) == 0
    return json.loads(path.read_text())


def test_tiny_benchmark_reports_every_field(tiny_report):
    for section, fields in REQUIRED.items():
        node = tiny_report[section] if section else tiny_report
        assert fields <= set(node), f"{section or 'top level'} lacks {fields - set(node)}"
    assert set(tiny_report["variants"]) == {"step", "step_with_augment"}
    for variant in tiny_report["variants"].values():
        assert SUMMARY_FIELDS <= set(variant)
        assert IPS_FIELDS <= set(variant["images_per_sec"])
        assert variant["images_per_sec"]["median"] > 0
        assert len(variant["images_per_sec"]["per_repeat"]) == 2
        assert variant["mfu"] is None  # no known peak for a CPU
    assert tiny_report["num_devices"] == 8 and tiny_report["global_batch"] == 64
    assert tiny_report["memory"]["peak_bytes_estimate"] > 0
    assert tiny_report["flops"]["xla_flops_per_image"] > 0
    assert tiny_report["flops"]["model_flops_per_image"] > 0
    assert tiny_report["floor"] is None  # --nofloor
    assert tiny_report["transfer_guard"] == "disallow"
    assert tiny_report["donation"]["all_donated"]
    if HAVE_TORCH:
        assert TORCH_FIELDS <= set(tiny_report["torch"])
        assert tiny_report["torch"]["jax_over_torch"] > 0
    json.dumps(tiny_report)  # plain JSON all the way down


def test_bf16_loss_curve_follows_fp32(tiny_report):
    """Same start and data: bf16 compute changes the loss by rounding, not by training noise."""
    check = tiny_report["loss_check"]
    assert len(check["float32"]) == len(check["bfloat16"]) == 2
    assert np.all(np.isfinite(check["bfloat16"]))
    np.testing.assert_allclose(check["bfloat16"], check["float32"], atol=0.05)


def test_shuffle_bn_all_to_all_moves_an_eighth_of_gathering_all_images(tiny_report):
    """8 devices, bn_mode shuffle: each device's all_to_all of key images is <= 1/8 of what the
    official all-gather of every image would bring to it, and no image is all-gathered."""
    assert tiny_report["model"]["bn_mode"] == "shuffle"
    report = tiny_report["collectives"]
    assert report["num_devices"] == 8
    shuffled = report["shuffle_images_all_to_all_bytes"]
    gathered = report["gather_all_images_bytes"]
    assert gathered == 64 * 16 * 16 * 1 * 4
    assert 0 < shuffled <= gathered / 8
    assert not any(key.startswith("all-gather") for key in report["by_payload"])
    assert "all-to-all:keys" in report["by_payload"]  # the keys travel back the same way


@pytest.fixture(scope="module")
def tiny_setup():
    """The tiny preset on 8 devices (compiled code shared with the run above, rbg keys as it),
    synthetic views, and a maker of fresh states (each test donates its own)."""
    config = tiny_config()
    built = setup(config, 8, steps_per_epoch=STEPS_PER_EPOCH)
    return built, SyntheticViews(built.mesh, config), built.initial_state


def test_step_donates_its_state(tiny_setup):
    built, views, fresh_state = tiny_setup
    state = fresh_state()
    images_q, images_k = views(0)
    old = jax.tree.leaves(state)
    state, metrics = built.algorithm.train_step(state, images_q, images_k)
    assert all(leaf.is_deleted() for leaf in old)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert np.isfinite(float(metrics["loss"]))


def test_no_host_transfers_inside_the_training_loop(tiny_setup):
    """Augmentation + step for a few steps under ``transfer_guard("disallow")``: the epoch's
    indices, the step counter and the augmentation key stay on device, so nothing crosses
    between host and device."""
    built, views, fresh_state = tiny_setup
    train_step = built.algorithm.train_step
    state = fresh_state()
    state, _ = train_step(state, *views(0))  # compile outside the guard
    losses = []
    with jax.transfer_guard("disallow"):
        for step in range(1, 4):
            state, metrics = train_step(state, *views(step))
            losses.append(metrics["loss"])
        with pytest.raises(Exception, match="[Dd]isallowed"):  # the guard is really on
            jax.jit(lambda x: x + 1)(np.ones(3, np.float32))
    assert np.all(np.isfinite(jax.device_get(losses)))


def test_bf16_computes_convolutions_in_bf16_and_keeps_float32_state():
    """``model.dtype=bfloat16``: every conv and the encoder matmuls take bf16 operands, while
    parameters, BN statistics, optimizer state, queue, logits and loss stay float32."""
    built = setup(tiny_config(**{"model.dtype": "bfloat16"}), 1)
    state, images = built.abstract_state(), abstract_images(built)
    train_step = built.algorithm.train_step
    new_state, metrics = jax.eval_shape(train_step, state, images, images)
    for tree in (state, new_state):
        for name in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
            assert {leaf.dtype for leaf in jax.tree.leaves(getattr(tree, name))} == {F32}
        floats = [
            x for x in jax.tree.leaves(tree.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)
        ]
        assert floats and all(x.dtype == jnp.float32 for x in floats)  # momentum buffers
        assert tree.queue.dtype == jnp.float32
    assert all(metrics[k].dtype == jnp.float32 for k in ("loss", "top1", "positive_similarity"))

    ops = collect_matmuls(jax.make_jaxpr(train_step)(state, images, images))
    convs = [op for op in ops if op.name == "conv_general_dilated"]
    assert convs and all(d == "bfloat16" for op in convs for d in op.dtypes)
    head = [op for op in ops if op.name == "dot_general" and (32, 128) in op.shapes]
    assert head and all(d == "bfloat16" for op in head for d in op.dtypes)  # the linear head
    with_queue = [  # q @ queue.T forward, and its gradient w.r.t. q
        op for op in ops if op.name == "dot_general" and {(96, 128), (128, 96)} & set(op.shapes)
    ]
    assert len(with_queue) == 2 and all(d == "float32" for op in with_queue for d in op.dtypes)


def test_presets_and_overrides_resolve_without_compiling():
    """ml_collections' own ``--config.KEY=VALUE`` on top of the preset's config file."""
    argv = ["--preset", "resnet18-cifar", "--config.moco.queue_size", "8192", "--config.seed=3"]
    options = cli.options_from(cli.parse_args([*argv, "--num_devices=1"]))
    assert options.config_path is None and options.overrides == {"moco.queue_size": 8192, "seed": 3}
    config, _ = resolve_config(options)
    assert config.batch_size == 256 and config.model.bn_group_size == 32  # 8 BN groups
    assert config.moco.queue_size == 8192 and config.seed == 3
    assert config.model.dtype == "float32"  # CPU: auto keeps the config's dtype
    config, _ = resolve_config(Options(preset="resnet50", num_devices=2, dtype="bfloat16"))
    assert config.batch_size == 512 and config.model.dtype == "bfloat16"
    with pytest.raises(ValueError, match="no config field"):
        resolve_config(Options(preset="tiny", overrides={"moco.nope": 1}))
    # A config file of one's own keeps its batch; an override of the batch wins over the preset's.
    path = str(ROOT / "configs" / "smoke.py")
    options = cli.options_from(cli.parse_args(["--config", path, "--num_devices=1"]))
    assert options.config_path == path and resolve_config(options)[0].batch_size == 64
    options = cli.options_from(cli.parse_args(["--preset=resnet50", "--config.batch_size=8"]))
    assert resolve_config(options)[0].batch_size == 8


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--preset", "tiny", "--config.moco.nope=1"], ["no config field", "nope"]),
        (["--preset", "tiny", "--config.batch_size=abc"], ["config.batch_size", "abc"]),
        (["--config", "configs/missing.py"], ["missing.py"]),
        (["--preset", "tiny", "--config.batch_size=60"], ["batch_size"]),  # not divisible by 8
        (["--preset", "huge"], ["preset"]),
        (["--preset", "tiny", "--stepz=3"], ["stepz"]),
    ],
)
def test_bad_command_line_is_one_error_line(argv, words, capsys):
    """An unknown field, a bad value, a missing file or a config the step refuses: exit code 2
    and one ``error:`` line naming the cause, nothing run."""
    assert cli.main([*argv, "--nocollectives", "--loss_steps=0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error
    assert all(word in error for word in words), error


def test_help_shows_positive_switches_and_no_internal_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--preset", "tiny", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for switch in ("--[no]floor:", "--[no]collectives:", "--[no]fit_batch:", "--config:"):
        assert f"\n  {switch}" in text, text
    assert "no_floor" not in text and "collectives_worker" not in text
    assert "(internal)" not in text and ".py')" not in text  # no config file as a default


def _conv(x, w, layout=("NHWC", "HWIO", "NHWC")):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=layout)


def test_xla_floor_times_each_distinct_op():
    """Forward and both gradients of a conv, a matmul used twice: counted, FLOPs exact, timed."""

    def loss(x, w, a, b):
        return jnp.sum(_conv(x, w)) + jnp.sum(a @ b) + jnp.sum(jnp.tanh(a) @ b)

    args = (
        jnp.ones((2, 8, 8, 3)),
        jnp.ones((3, 3, 3, 4)),
        jnp.ones((5, 6)),
        jnp.ones((6, 7)),
    )
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(*args)
    ops = collect_matmuls(jaxpr)
    convs = [op for op in ops if op.name == "conv_general_dilated"]
    dots = [op for op in ops if op.name == "dot_general"]
    assert len(convs) == 3 and all(op.count == 1 for op in convs)  # forward, d/dx, d/dw
    assert (
        sum(op.count for op in dots if op.operands == [((5, 6), "float32"), ((6, 7), "float32")])
        == 2
    )
    # Every conv here does the same multiply-adds: 2 x 8 x 8 x 4 outputs x 3 x 3 x 3 terms.
    assert {op.flops for op in convs} == {2.0 * 2 * 8 * 8 * 4 * 3 * 3 * 3}
    assert {op.flops for op in dots if op.count == 2} == {2.0 * 5 * 7 * 6}

    floor = xla_floor(jaxpr, jax.devices()[0], repeats=2)
    assert floor["floor_ms"] > 0 and floor["distinct_ops"] == len(ops)
    assert floor["total_ops"] == sum(op.count for op in ops)
    assert all(row["ms_each"] > 0 for row in floor["ops"])


def test_collectives_parser_reads_async_and_grouped_forms():
    """GPU/TPU HLO spells collectives as async start/done pairs with iota or listed groups:
    each counts once (at ``-done``), with its group size."""
    hlo = """
  %ags = (f32[8]{0}, f32[64]{0}) all-gather-start(f32[8]{0} %p), replica_groups=[1,8]<=[8]
  %agd = f32[64]{0} all-gather-done((f32[8]{0}, f32[64]{0}) %ags)
  %ars = f32[1000]{0} all-reduce-start(f32[1000]{0} %g), replica_groups={{0,1,2,3}}, to_apply=%add
  %ard = f32[1000]{0} all-reduce-done(f32[1000]{0} %ars)
  %a2a = (bf16[4,16,16,1]{3,2,1,0:T(8,128)}, bf16[4,16,16,1]{3,2,1,0}) all-to-all(%x, %y)
  ROOT %cp = f32[4]{0} collective-permute(f32[4]{0} %z), source_target_pairs={{0,1}}
"""
    ops = {op["kind"]: op for op in compiled_info.parse_collectives(hlo, num_devices=8)}
    assert sorted(ops) == ["all-gather", "all-reduce", "all-to-all", "collective-permute"]
    assert ops["all-gather"]["result_bytes"] == 256 and ops["all-gather"]["group_size"] == 8
    assert ops["all-reduce"]["result_bytes"] == 4000 and ops["all-reduce"]["group_size"] == 4
    assert ops["all-to-all"]["result_bytes"] == 2 * 4 * 16 * 16 * 2
    assert ops["all-to-all"]["group_size"] == 8  # no groups written: the whole mesh
    assert ops["collective-permute"]["elements"] == 4


def test_epoch_benchmark_compares_real_data_with_views_on_device(tmp_path):
    """``python -m benchmarks.epoch``, smoke config (MLP backbone: the input is the point) on real
    Fashion-MNIST: an epoch through the trainer's input pipeline vs its steps on views on device."""
    from data_fixtures import fashion_mnist_data_dir

    from benchmarks import epoch

    out = tmp_path / "epoch.json"
    config_path = str(ROOT / "configs" / "smoke.py")
    argv = ["--config", config_path, "--config.model.backbone=mlp", "--json", str(out)]
    argv.append(f"--config.dataset.data_dir={fashion_mnist_data_dir()}")
    assert epoch.main(argv) == 0
    report = json.loads(out.read_text())
    jax_side = report["jax"]
    assert jax_side["steps"] == jax_side["steps_per_epoch"] == 8  # 512 examples / batch 64
    for key in ("real_s", "synthetic_s", "real_images_per_sec", "synthetic_images_per_sec"):
        assert jax_side[key] > 0, key
    assert jax_side["input_overhead"] == pytest.approx(
        jax_side["real_s"] / jax_side["synthetic_s"] - 1
    )
    assert isinstance(jax_side["within_target"], bool)
    assert np.isfinite(jax_side["last_loss"])
    assert report["num_devices"] == 8 and report["batch_size"] == 64


def test_epoch_benchmark_refuses_a_bad_config_in_one_line(capsys):
    from benchmarks import epoch

    config_path = str(ROOT / "configs" / "smoke.py")
    assert epoch.main(["--config", config_path, "--config.batch_size=60"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "batch_size" in error and "Traceback" not in error


def test_torch_dataloader_epoch_of_the_official_pipeline():
    """The PyTorch side of the epoch comparison (skipped without torch and torchvision)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from data_fixtures import fashion_mnist_data_dir
    from PIL import Image

    from benchmarks.torch_epoch import make_view_transform, time_torch_epoch

    config = tiny_config(**{"dataset.data_dir": fashion_mnist_data_dir()})
    view = make_view_transform(config, 0)(Image.fromarray(np.full((28, 28), 128, np.uint8)))
    assert tuple(view.shape) == (1, 16, 16)  # cropped and resized to image_size, one channel
    result = time_torch_epoch(config, steps=2, workers=0, log=lambda _: None)
    assert result["steps"] == 2 and result["epoch_s"] > 0 and np.isfinite(result["last_loss"])


def test_floor_pairs_time_the_floor_then_the_step_each_time():
    """Each pair is one floor measurement followed by one step timing; the ratio is theirs."""

    loss = lambda x, w: jnp.sum(_conv(x, w))
    jaxpr = jax.make_jaxpr(jax.grad(loss))(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)))
    step_seconds = iter([0.002, 0.004, 0.003])
    result = floor_pairs(jaxpr, jax.devices()[0], lambda: next(step_seconds), 3, repeats=2)
    assert [p["step_ms"] for p in result["pairs"]] == pytest.approx([2.0, 4.0, 3.0])
    for p in result["pairs"]:
        assert p["floor_ms"] > 0
        assert p["step_over_floor"] == pytest.approx(p["step_ms"] / p["floor_ms"])
    ratios = sorted(p["step_over_floor"] for p in result["pairs"])
    assert result["step_over_floor_median"] == pytest.approx(ratios[1])
