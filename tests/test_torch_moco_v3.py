"""Parity of the MoCo v3 training step with a PyTorch re-statement of facebookresearch/moco-v3.

``tests/torch_moco_v3.py`` restates moco-v3's ``moco/builder.py`` (``_build_mlp``, the
momentum update before the keys, ``contrastive_loss`` with all-gathered keys, positives at
``arange(N) + N * rank``, times ``2T``, ``ctr(q1, k2) + ctr(q2, k1)``), ``vits.py`` (timm's ViT,
fixed sin-cos ``pos_embed``, ``stop_grad_conv1``), ``moco/optimizer.py`` (LARS),
``torch.optim.AdamW`` and ``main_moco.py``'s per-step lr (warm-up, half-cycle cosine) and
momentum (``--moco-m-cos``) schedules, with SyncBN and 8 devices simulated in one process.
Both sides start from moco_jax's initial weights (copied over by name, parameter path ->
timm / torchvision name), see the same two views and take 3 steps on 8 devices with sync BN:

- ``vit``: a 16-wide ``vit_test`` (2 blocks, 2 heads, 8x8 images), ``v3_vit`` heads, AdamW,
  ``stop_grad_conv1``;
- ``resnet``: a two-stage ResNet of BasicBlocks (``tests/parity_resnet.py``'s ``resnet_parity``:
  the ResNet-18 code with stage sizes ``(1, 1)``, a downsample included),
  ``v3_resnet`` heads, LARS, ``zero_init_residual``.

After every step, in float32: the loss and the BN running statistics (base encoder, predictor,
momentum encoder) to 1e-4. Not every tensor: the loss cannot see some directions, the bias of
the ViT's final LayerNorm (the projector's first BN removes any shift) and the key third of
each qkv bias (softmax ignores a shift of a row's logits), so their gradient is 0 up to
rounding noise, which AdamW's ``m / sqrt(v)`` turns into steps of +-lr: two correct float32
implementations end 2e-2 apart there after two steps (and the running mean of the projector's
first BN, which follows that LayerNorm bias, 5e-3 apart: ``NULL_DIRECTION_STATS``, left out in
float32). So the same 3 steps run again in float64 on both sides (torch ``.double()``;
moco_jax under ``jax_enable_x64`` with its hard-coded float32 casts turned into float64 for the
run, see ``float64_library``), where the noise is far below AdamW's eps, and there every tensor
must agree to 1e-4: online and momentum parameters, BN statistics, the optimizer's moments,
and the loss to 1e-9, which only a run that is float64 end to end reaches (seen: the loss
3e-15, every tensor 3e-10 or closer; in float32 the loss 4e-6, the kept statistics 5e-7).
"""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_moco_v3 as ref  # noqa: E402
from parity_resnet import RESNET, RESNET_STAGES  # noqa: E402
from test_moco_v3 import (  # noqa: E402
    EPOCHS,
    M0,
    STEPS_PER_EPOCH,
    TEMPERATURE,
    WARMUP_EPOCHS,
    _optimizer_buffers,
    v3_config,
)

from moco_jax import build  # noqa: E402
from moco_jax.algorithms import momentum_schedule  # noqa: E402
from moco_jax.mesh import shard_batch  # noqa: E402
from moco_jax.models import base_width, batch_norm, resnet, vit  # noqa: E402
from moco_jax.models import encoder as encoder_module  # noqa: E402
from moco_jax.optim import scaled_learning_rate  # noqa: E402
from numpy_moco import tree_items  # noqa: E402

TOL = 1e-4
FLOAT64_LOSS_TOL = 1e-9
STEPS = 3
DEVICES = 8
BATCH = 16
IMAGE = (8, 8, 3)
PATCH = vit.VIT_SPECS["vit_test"][0]

# Statistics that float32 noise moves by ~1e-3 (module docstring): the running mean of the ViT
# projector's first BN follows the final LayerNorm's bias, a direction the loss cannot see.
NULL_DIRECTION_STATS = {"vit": {"head/fc1/mean"}}

# name: (backbone, width multiplier, head, optimizer, base lr per 256, weight decay).
CASES = {
    "vit": ("vit_test", 0.25, "v3_vit", "adamw", 0.5, 0.1),
    "resnet": (RESNET, 0.125, "v3_resnet", "lars", 40.0, 1e-2),
}


def make_config(case):
    backbone, width, head, optimizer, base_lr, weight_decay = CASES[case]
    config = v3_config(DEVICES, "sync", head, optimizer, base_lr, weight_decay, BATCH)
    config.dataset.image_size, config.dataset.num_channels = IMAGE[0], IMAGE[2]
    config.dataset.mean, config.dataset.std = (0.5,) * IMAGE[2], (0.25,) * IMAGE[2]
    config.model.backbone, config.model.width_multiplier = backbone, width
    config.model.cifar_stem = True
    config.model.mlp_dim, config.model.dim = 16, 8
    config.model.stop_grad_conv1 = head == "v3_vit"
    config.model.zero_init_residual = head == "v3_resnet"
    return config


def torch_model(case, config):
    """The re-statement of ``case``'s network (weights still torch's own)."""
    backbone, multiplier, head, *_ = CASES[case]
    if head == "v3_vit":
        _, width, depth, heads = vit.VIT_SPECS[backbone]
        width = int(round(width * multiplier))
        net = ref.VisionTransformer(IMAGE[0], PATCH, IMAGE[2], width, depth, heads, True)
        model = ref.MoCoV3ViT
    else:
        net = ref.CifarResNet(RESNET_STAGES, IMAGE[2], base_width(config.model))
        model = ref.MoCoV3ResNet
    return model(net, config.model.dim, config.model.mlp_dim, TEMPERATURE, DEVICES)


# --------------------------------------------------------------------------------------------
# moco_jax's trees <-> the torch model's tensors.

_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_MODULE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def torch_name(path: str, encoder: str, head_attr: str) -> str:
    """``backbone/blocks_0/attn/qkv/kernel`` -> ``<encoder>.blocks.0.attn.qkv.weight``;
    ``head/fc3/kernel`` -> ``<encoder>.<head_attr>.3.weight``; ``predictor/fc1/var`` ->
    ``predictor.1.running_var``; ``backbone/layer2_0/downsample_bn/scale`` ->
    ``<encoder>.layer2.0.downsample.1.weight``."""
    part, *modules, leaf = path.split("/")
    names = {"backbone": [encoder], "head": [encoder, head_attr], "predictor": ["predictor"]}[part]
    for module in modules:
        module = _MODULE.get(module, re.sub(r"^(layer\d+|blocks)_(\d+)$", r"\1.\2", module))
        names.append(module if part == "backbone" else module.removeprefix("fc"))
    return ".".join([*names, _LEAF.get(leaf, leaf)])


_TO_TORCH = {2: (1, 0), 4: (3, 2, 0, 1)}  # Dense [in, out] -> [out, in]; conv HWIO -> OIHW
_FROM_TORCH = {2: (1, 0), 4: (2, 3, 1, 0)}


def to_torch_layout(value: np.ndarray) -> np.ndarray:
    return value.transpose(_TO_TORCH[value.ndim]) if value.ndim in _TO_TORCH else value


def from_torch_layout(value: np.ndarray) -> np.ndarray:
    return value.transpose(_FROM_TORCH[value.ndim]) if value.ndim in _FROM_TORCH else value


def leaves(tree) -> dict[str, np.ndarray]:
    """``{path: array}`` of a nested dict (optax's ``MaskedNode``s of frozen tensors left out)."""
    return {k: np.asarray(v) for k, v in tree_items(jax.device_get(tree)) if hasattr(v, "shape")}


# (state field, torch module holding it).
FIELDS = {
    "params": "base_encoder",
    "batch_stats": "base_encoder",
    "ema_params": "momentum_encoder",
    "ema_batch_stats": "momentum_encoder",
}


def load_jax_state(model, state) -> None:
    """Every torch parameter and BN statistic <- moco_jax's (``pos_embed`` is a constant on both
    sides, ``num_batches_tracked`` unused)."""
    tensors = model.state_dict(keep_vars=True)
    loaded = set()
    with torch.no_grad():
        for field, encoder in FIELDS.items():
            for path, value in leaves(getattr(state, field)).items():
                name = torch_name(path, encoder, model.head_attr)
                target = tensors[name]
                target.copy_(torch.from_numpy(np.array(to_torch_layout(value))))
                loaded.add(name)
        for encoder in FIELDS.values():
            name = f"{encoder}.pos_embed"
            if name in tensors:  # moco_jax's float32 table (numpy's sin, cos and torch's differ
                # by an ulp: 3e-8 in a float64 loss); test_pos_embed_* compares the two
                grid, width = IMAGE[0] // PATCH, tensors[name].shape[-1]
                table = vit.sincos_position_embedding(grid, grid, width)
                tensors[name].copy_(torch.from_numpy(np.array(table)))
                loaded.add(name)
    expected = {k for k in tensors if not k.endswith("num_batches_tracked")}
    assert loaded == expected, (sorted(expected - loaded), sorted(loaded - expected))


def torch_views(model, optimizer, state, optimizer_name) -> dict[str, dict[str, np.ndarray]]:
    """The torch side of every compared tree, in moco_jax's layout and paths."""
    tensors = model.state_dict(keep_vars=True)

    def fetch(tree, encoder, get=lambda t: t):
        out = {}
        for path in leaves(tree):
            tensor = get(tensors[torch_name(path, encoder, model.head_attr)])
            out[path] = from_torch_layout(tensor.detach().numpy().copy())
        return out

    views = {field: fetch(getattr(state, field), encoder) for field, encoder in FIELDS.items()}
    buffers = _optimizer_buffers(state.opt_state, optimizer_name)
    keys = {"mu": "mu"} if optimizer_name == "lars" else {"mu": "exp_avg", "nu": "exp_avg_sq"}
    for ours, theirs in keys.items():
        views[f"optimizer {ours}"] = fetch(
            buffers[ours], "base_encoder", lambda t, key=theirs: optimizer.state[t][key]
        )
    return views


def jax_views(state, optimizer_name) -> dict[str, dict[str, np.ndarray]]:
    views = {field: leaves(getattr(state, field)) for field in FIELDS}
    for name, tree in _optimizer_buffers(state.opt_state, optimizer_name).items():
        views[f"optimizer {name}"] = leaves(tree)
    return views


# --------------------------------------------------------------------------------------------
# The float64 run of moco_jax.


class _Float64Numpy:
    """``jax.numpy`` in which ``float32`` is ``float64``: the model modules' explicit casts
    (BatchNorm statistics, pooled features, embeddings, attention softmax, the momentum
    coefficient) then keep float64."""

    float32 = jnp.float64

    def __getattr__(self, name):
        return getattr(jnp, name)


@contextlib.contextmanager
def float64_library():
    """moco_jax computing in float64: x64 on, ``model.dtype="float32"`` meaning float64 and the
    hard-coded float32 casts of the step's modules swapped for float64 ones; all undone after."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for module in (batch_norm, encoder_module, resnet, vit, momentum_schedule):
                patch.setattr(module, "jnp", _Float64Numpy())
            patch.setitem(encoder_module.DTYPES, "float32", jnp.float64)
            yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _to_float64(tree):
    is_float = lambda x: jnp.issubdtype(x.dtype, jnp.floating)
    return jax.tree.map(lambda x: x.astype(jnp.float64) if is_float(x) else x, tree)


# --------------------------------------------------------------------------------------------
# The runs.


def _run(case, float64):
    """3 steps of moco_jax and of the re-statement from the same weights and views; per step
    ``{quantity: (jax, torch)}``."""
    config = make_config(case)
    optimizer_name, weight_decay = config.optim.name, config.optim.weight_decay
    context = float64_library() if float64 else contextlib.nullcontext()
    dtype = np.float64 if float64 else np.float32
    with context, jax.default_matmul_precision("highest"):
        built = build(config, STEPS_PER_EPOCH, devices=jax.devices()[:DEVICES])
        state = built.initial_state(0)
        train_step = built.algorithm.train_step
        if float64:
            state = _to_float64(state)
        model = torch_model(case, config).to(torch.float64 if float64 else torch.float32)
        load_jax_state(model, state)
        if optimizer_name == "lars":
            optimizer = ref.LARS(
                model.parameters(), weight_decay=weight_decay, momentum=config.optim.momentum
            )
        else:
            optimizer = torch.optim.AdamW(
                model.parameters(), weight_decay=weight_decay, betas=tuple(config.optim.betas)
            )
        model.train()
        peak = scaled_learning_rate(config.optim, BATCH)
        initial = jax_views(state, optimizer_name)["params"]
        data = np.random.default_rng(1)
        records = []
        for step in range(STEPS):
            x1, x2 = (data.normal(size=(BATCH, *IMAGE)).astype(np.float32) for _ in range(2))
            x1, x2 = x1.astype(dtype), x2.astype(dtype)
            state, metrics = train_step(
                state, shard_batch(built.mesh, x1), shard_batch(built.mesh, x2)
            )
            epoch = step / STEPS_PER_EPOCH
            lr = ref.warmup_cosine_lr(peak, epoch, WARMUP_EPOCHS, EPOCHS)
            m = ref.cosine_momentum(M0, epoch, EPOCHS)
            to_torch = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            loss = ref.train_step(model, optimizer, to_torch(x1), to_torch(x2), lr, m)
            metrics = jax.device_get(metrics)
            record = {
                "loss": (np.asarray(metrics["loss"]), np.asarray(loss)),
                "learning_rate": (np.asarray(metrics["learning_rate"]), np.asarray(lr)),
                "moco_momentum": (np.asarray(metrics["moco_momentum"]), np.asarray(m)),
            }
            ours = jax_views(state, optimizer_name)
            theirs = torch_views(model, optimizer, state, optimizer_name)
            record.update({name: (ours[name], theirs[name]) for name in ours})
            records.append(record)
    return {"case": case, "records": records, "initial": initial, "dtype": dtype}


@pytest.fixture(scope="module", params=sorted(CASES))
def float32_run(request):
    return _run(request.param, float64=False)


@pytest.fixture(scope="module", params=sorted(CASES))
def float64_run(request):
    return _run(request.param, float64=True)


def max_diff(ours, theirs) -> float:
    if isinstance(ours, dict):
        assert sorted(ours) == sorted(theirs)
        return max((max_diff(ours[k], theirs[k]) for k in ours), default=0.0)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))


def assert_close(ours, theirs, what, tol=TOL):
    if isinstance(ours, dict):
        assert sorted(ours) == sorted(theirs), what
        for key in ours:
            assert_close(ours[key], theirs[key], f"{what}: {key}", tol)
        return
    np.testing.assert_allclose(ours, theirs, atol=tol, rtol=tol, err_msg=what)


def _report(run):
    for step, record in enumerate(run["records"]):
        diffs = {name: f"{max_diff(*pair):.1e}" for name, pair in record.items()}
        print(f"\n{run['case']} {np.dtype(run['dtype']).name} step {step}: {diffs}")


def test_float32_loss_and_bn_statistics(float32_run):
    """float32: the loss, lr, m and every BN running statistic (base encoder with projector,
    predictor, momentum encoder) after each of 3 steps, but those in ``NULL_DIRECTION_STATS``."""
    _report(float32_run)
    skip = NULL_DIRECTION_STATS.get(float32_run["case"], set())
    for step, record in enumerate(float32_run["records"]):
        where = f"{float32_run['case']} step {step}"
        assert_close(*record["loss"], f"{where} loss")
        for name in ("batch_stats", "ema_batch_stats"):
            ours, theirs = (
                {k: v for k, v in tree.items() if k not in skip} for tree in record[name]
            )
            assert_close(ours, theirs, f"{where} {name}")
        np.testing.assert_allclose(*record["learning_rate"], rtol=1e-6, err_msg=where)
        np.testing.assert_allclose(*record["moco_momentum"], rtol=1e-6, err_msg=where)


def test_float64_every_tensor(float64_run):
    """float64: every tensor after each of 3 steps: online parameters (backbone, projector,
    predictor), momentum encoder after its update, BN statistics, optimizer moments; the loss
    to ``FLOAT64_LOSS_TOL``. The weights must have moved far beyond the tolerance."""
    _report(float64_run)
    for step, record in enumerate(float64_run["records"]):
        where = f"{float64_run['case']} step {step}"
        assert record["loss"][0].dtype == np.float64, where
        for name, pair in record.items():
            assert_close(*pair, f"{where} {name}")
        np.testing.assert_allclose(*record["loss"], atol=FLOAT64_LOSS_TOL, rtol=0, err_msg=where)
    final = float64_run["records"][-1]["params"][0]
    assert max_diff(final, float64_run["initial"]) > 100 * TOL


def test_pos_embed_restatement_matches_moco_jax():
    """The re-statement's sin-cos table (torch float32) against moco_jax's (numpy float32), which
    both sides of the runs use."""
    for grid, width in ((2, 16), (4, 64)):
        ours = vit.sincos_position_embedding(grid, grid, width)
        np.testing.assert_allclose(ref.sincos_table(grid, width).numpy(), ours, atol=1e-6, rtol=0)
