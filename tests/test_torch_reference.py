"""Parity of the moco_jax training step with a PyTorch re-statement of the official MoCo step.

``tests/torch_moco.py`` restates facebookresearch/moco (momentum update before the keys, Shuffle-BN
by a permutation, normalised q/k, ``[l_pos, l_neg] / T`` with zero labels, enqueue after the
logits, ``torch.optim.SGD`` with coupled weight decay, per-epoch cosine lr) with the CIFAR demo's
``SplitBatchNorm``, on a two-stage ResNet of BasicBlocks (``tests/parity_resnet.py``). Both start
from the same weights and queue (copied over with the weight bridge), see the same images and
the same key permutation, and must agree after every step.
Also checks that ``.pth`` files are read through the bridge and that pickled code is refused.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
from parity_resnet import RESNET, torch_resnet  # noqa: E402

from configs import smoke  # noqa: E402
from moco_jax import build  # noqa: E402
from moco_jax.algorithms.shuffle_bn import shuffle_permutations  # noqa: E402
from moco_jax.interop import names_resnet, torch_files  # noqa: E402
from moco_jax.mesh import shard_batch  # noqa: E402
from moco_jax.models import base_width  # noqa: E402
from moco_jax.optim import scaled_learning_rate  # noqa: E402
from tests.torch_helpers import moco_checkpoint_to_flax  # noqa: E402
from tests.torch_moco import MoCo, cosine_learning_rate, train_step  # noqa: E402

TOL = 1e-4
STEPS = 3
BATCH = 16
QUEUE_SIZE = 40  # not a multiple of the batch: the third enqueue wraps (ptr 0 -> 16 -> 32 -> 8)
GROUP_SIZE = 8  # two BN groups, as SplitBatchNorm(num_splits=2)
EPOCHS = STEPS  # one step per epoch, so the cosine lr changes every step
BASE_LR = 4.0  # x 16/256 = 0.25: large enough that the weights visibly move

# head -> (image shape HWC, dim, seed of the weights, queue and images). The network is
# ``tests/parity_resnet.py``'s two-stage ResNet (width 4, SplitBatchNorm on both sides). The
# seeds keep every pre-ReLU activation of the query encoder 1e-6 or more away from 0 in all
# steps, while the two sides differ by ~1e-7: float rounding then cannot put a ReLU on different
# sides of its kink in the two implementations, which would change that gradient by O(1e-3).
# 16 x 16 images: with the ResNet-18 at 8 x 8 (1 x 1 in its last stage, each BN group's
# statistics from 8 numbers) a 1-ulp change of the initial weights moved the two sides' weights
# 4e-3 apart by the second step.
CASES = {"linear": ((16, 16, 1), 16, 2), "mlp": ((16, 16, 3), 8, 3)}

STAT_LEAVES = ("running_mean", "running_var")


def make_config(head):
    image_shape, dim, _ = CASES[head]
    config = smoke.get_config()
    config.batch_size = BATCH
    config.epochs = EPOCHS
    config.dataset.image_size = image_shape[0]
    config.dataset.num_channels = image_shape[2]
    config.dataset.mean = (0.5,) * image_shape[2]  # one value per channel (validated)
    config.dataset.std = (0.25,) * image_shape[2]
    config.model.backbone = RESNET
    config.model.head = head
    config.model.dim = dim
    config.model.bn_mode = "shuffle"
    config.model.bn_group_size = GROUP_SIZE
    config.moco.queue_size = QUEUE_SIZE
    config.moco.momentum = 0.9
    config.moco.temperature = 0.1
    config.optim.base_lr = BASE_LR
    config.optim.momentum = 0.9
    config.optim.weight_decay = 5e-4
    config.optim.schedule = "cosine"
    return config


def torch_state_dict(variables):
    """Flax variables -> torchvision-named torch tensors, through the weight bridge."""
    return {k: torch.tensor(np.array(v)) for k, v in names_resnet.flax_to_torch(variables).items()}


def split_state(state_dict):
    """``{name: array}`` -> (parameters, BN running statistics); ``num_batches_tracked`` dropped."""
    params, stats = {}, {}
    for name, value in state_dict.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            continue
        value = (
            value.detach().numpy().copy() if isinstance(value, torch.Tensor) else np.asarray(value)
        )
        (stats if leaf in STAT_LEAVES else params)[name] = value
    return params, stats


def max_abs_diff(a, b):
    """Largest |a - b| over same-named arrays; names must match."""
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def assert_close_dicts(actual, desired, what):
    assert sorted(actual) == sorted(desired), what
    for name in actual:
        np.testing.assert_allclose(
            actual[name], desired[name], atol=TOL, rtol=TOL, err_msg=f"{what}: {name}"
        )


def jax_side(state):
    """Both encoders of a moco_jax state as torchvision-named (params, stats) dicts."""
    q = names_resnet.flax_to_torch({"params": state.params, "batch_stats": state.batch_stats})
    k = names_resnet.flax_to_torch(
        {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    )
    return split_state(q), split_state(k)


@pytest.fixture(scope="module", params=sorted(CASES))
def reference_run(request):
    """Three steps of moco_jax and of the PyTorch re-statement from identical starting points.

    Returns per-step records (both sides' numbers) plus the final torch model and jax state.
    """
    head = request.param
    image_shape, dim, seed = CASES[head]
    config = make_config(head)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    built = build(config, steps_per_epoch=1, devices=jax.devices()[:1])
    mesh = built.mesh
    with jax.default_matmul_precision("highest"):
        state = built.initial_state(seed)
    jax_step = built.algorithm.train_step

    width = base_width(config.model)
    model = MoCo(
        lambda: torch_resnet(image_shape[2], width, dim, head == "mlp", BATCH // GROUP_SIZE),
        dim,
        QUEUE_SIZE,
        config.moco.momentum,
        config.moco.temperature,
    )
    # strict=True: the bridge must produce exactly torchvision's names and shapes.
    model.encoder_q.load_state_dict(
        torch_state_dict({"params": state.params, "batch_stats": state.batch_stats}), strict=True
    )
    model.encoder_k.load_state_dict(
        torch_state_dict({"params": state.ema_params, "batch_stats": state.ema_batch_stats}),
        strict=True,
    )
    with torch.no_grad():
        model.queue.copy_(torch.tensor(np.array(state.queue).T))  # [K, D] -> [D, K]
        model.queue_ptr[0] = int(state.queue_ptr)
    model.train()
    # Smallest |input| of the query encoder's ReLUs in the current step (see CASES).
    relu_margin = [np.inf]

    def track_relu_margin(_, inputs):
        relu_margin[0] = min(relu_margin[0], float(inputs[0].detach().abs().min()))

    for module in model.encoder_q.modules():
        if isinstance(module, torch.nn.ReLU):
            module.register_forward_pre_hook(track_relu_margin)
    peak_lr = scaled_learning_rate(config.optim, BATCH)
    optimizer = torch.optim.SGD(
        model.parameters(),
        peak_lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
    )
    criterion = torch.nn.CrossEntropyLoss()

    (initial_q, _), _ = jax_side(state)
    rng = state.rng
    data = np.random.default_rng(seed)
    records = []
    with jax.default_matmul_precision("highest"):
        for step in range(STEPS):
            images_q = data.standard_normal((BATCH, *image_shape), dtype=np.float32)
            images_k = data.standard_normal((BATCH, *image_shape), dtype=np.float32)
            rng, shuffle_rng = jax.random.split(rng)
            send, receive = shuffle_permutations(shuffle_rng, 0, BATCH)
            idx_shuffle = torch.tensor(np.asarray(send)[np.asarray(receive)], dtype=torch.long)

            state, metrics = jax_step(
                state, shard_batch(mesh, images_q), shard_batch(mesh, images_k)
            )
            lr = cosine_learning_rate(peak_lr, step, EPOCHS)
            relu_margin[0] = np.inf
            torch_loss = train_step(
                model,
                optimizer,
                criterion,
                torch.tensor(images_q.transpose(0, 3, 1, 2)),
                torch.tensor(images_k.transpose(0, 3, 1, 2)),
                idx_shuffle,
                lr,
            )
            (jq, jq_stats), (jk, jk_stats) = jax_side(state)
            tq, tq_stats = split_state(model.encoder_q.state_dict())
            tk, tk_stats = split_state(model.encoder_k.state_dict())
            records.append(
                {
                    "loss": (float(metrics["loss"]), torch_loss),
                    "learning_rate": (float(metrics["learning_rate"]), lr),
                    "query_params": (jq, tq),
                    "query_bn_stats": (jq_stats, tq_stats),
                    "key_params": (jk, tk),
                    "key_bn_stats": (jk_stats, tk_stats),
                    "queue": (np.array(state.queue), model.queue.numpy().T.copy()),
                    "queue_ptr": (int(state.queue_ptr), int(model.queue_ptr[0])),
                    "relu_margin": relu_margin[0],
                    "rng": (
                        np.asarray(jax.random.key_data(state.rng)),
                        np.asarray(jax.random.key_data(rng)),
                    ),
                }
            )
    return {
        "head": head,
        "records": records,
        "initial_query_params": split_state(initial_q)[0],
        "model": model,
        "optimizer": optimizer,
        "state": state,
    }


def max_differences(record):
    """Quantity -> max |jax - torch| of one step's record."""
    out = {}
    for name, pair in record.items():
        if name in ("rng", "relu_margin"):
            continue
        j, t = pair
        if isinstance(j, dict):
            out[name] = max_abs_diff(j, t)
        else:
            out[name] = float(np.max(np.abs(np.asarray(j, np.float64) - np.asarray(t))))
    return out


def test_training_steps_match_official_moco(reference_run):
    """Loss, both encoders' weights and BN statistics, queue and pointer after each of 3 steps.

    Catches any departure from the reference's order of operations (momentum update before the
    keys, enqueue after the logits), Shuffle-BN / split-BN grouping, the loss, SGD with coupled
    weight decay and the per-epoch cosine schedule, and queue wrap-around.
    """
    for step, record in enumerate(reference_run["records"]):
        margin = record["relu_margin"]
        where = f"{reference_run['head']} step {step} (min |ReLU input| {margin:.1e}): "
        print(where, {k: f"{v:.2e}" for k, v in max_differences(record).items()})
        np.testing.assert_array_equal(*record["rng"], err_msg=where + "rng")
        np.testing.assert_allclose(*record["loss"], atol=TOL, rtol=TOL, err_msg=where + "loss")
        np.testing.assert_allclose(*record["learning_rate"], rtol=1e-6, err_msg=where + "lr")
        for name in ("query_params", "query_bn_stats", "key_params", "key_bn_stats"):
            assert_close_dicts(*record[name], where + name)
        np.testing.assert_allclose(*record["queue"], atol=TOL, rtol=TOL, err_msg=where + "queue")
        assert record["queue_ptr"][0] == record["queue_ptr"][1], where + "queue_ptr"
    assert [r["queue_ptr"][0] for r in reference_run["records"]] == [16, 32, 8]  # wrapped


def test_reference_run_moves_the_weights(reference_run):
    """The parity test is only meaningful if training changes the weights far beyond ``TOL``."""
    initial = reference_run["initial_query_params"]
    final = reference_run["records"][-1]["query_params"][0]
    assert max_abs_diff(initial, final) > 100 * TOL


def _torch_numpy(state_dict):
    return {k: v.detach().numpy() for k, v in state_dict.items()}


def test_load_torch_file_reads_a_state_dict(reference_run, tmp_path):
    """A torchvision-style ``.pth`` state dict reads back unchanged and converts to Flax."""
    encoder = reference_run["model"].encoder_q
    path = tmp_path / "encoder.pth"
    torch.save(encoder.state_dict(), path)
    loaded = torch_files.load_torch_file(path)
    expected = _torch_numpy(encoder.state_dict())
    assert list(loaded) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)
    variables = names_resnet.torch_to_flax(loaded)
    state = reference_run["state"]
    for ours, theirs in (
        (variables["params"], state.params),
        (variables["batch_stats"], state.batch_stats),
    ):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, np.asarray(b), atol=TOL, rtol=TOL),
            ours,
            theirs,
        )


def test_load_torch_file_reads_an_official_checkpoint(reference_run, tmp_path):
    """An official ``checkpoint_XXXX.pth.tar`` (DataParallel names, [D, K] queue, optimizer state)
    loads through ``load_torch_file`` + ``moco_checkpoint_to_flax`` with every value intact."""
    model, optimizer = reference_run["model"], reference_run["optimizer"]
    state_dict = {
        f"module.{k}": v
        for k, v in model.state_dict().items()
        if k.startswith(("encoder_q.", "encoder_k.")) or k in ("queue", "queue_ptr")
    }
    path = tmp_path / "checkpoint_0003.pth.tar"
    torch.save(
        {
            "epoch": STEPS,
            "arch": "resnet18",
            "state_dict": state_dict,
            "optimizer": optimizer.state_dict(),
        },
        path,
    )
    converted = moco_checkpoint_to_flax(torch_files.load_torch_file(path))

    for encoder in ("encoder_q", "encoder_k"):
        expected = _torch_numpy(getattr(model, encoder).state_dict())
        roundtrip = names_resnet.flax_to_torch(converted[encoder])
        assert sorted(roundtrip) == sorted(expected)
        for name, value in expected.items():
            if not name.endswith("num_batches_tracked"):
                np.testing.assert_array_equal(roundtrip[name], value, err_msg=name)
    np.testing.assert_array_equal(converted["queue"], model.queue.numpy().T)
    assert converted["queue"].shape == (QUEUE_SIZE, model.queue.shape[0])
    assert converted["queue_ptr"] == int(model.queue_ptr[0]) == 8

    # The converted tree has exactly moco_jax's structure (and, after 3 steps, close values).
    state = reference_run["state"]
    for ours, theirs in (
        (converted["encoder_q"]["params"], state.params),
        (converted["encoder_k"]["batch_stats"], state.ema_batch_stats),
    ):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, np.asarray(b), atol=TOL, rtol=TOL),
            ours,
            theirs,
        )


DOWNSAMPLE_BACKWARD = """
torch.set_num_threads(1)
torch.manual_seed(0)
conv = DownsampleConv(4, 8, 1, 2, bias=False).to(memory_format=torch.channels_last)
ref = torch.nn.Conv2d(4, 8, 1, 2, bias=False).double()
ref.weight.data.copy_(conv.weight.data)
x = torch.randn(8, 4, 16, 16)
for _ in range(10):
    conv.weight.grad = None
    conv(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
ref(x.double()).square().sum().backward()
torch.testing.assert_close(conv.weight.grad.double(), ref.weight.grad, rtol=1e-5, atol=1e-4)
"""


def test_thin_downsample_convolution_backward_on_cpu():
    """oneDNN 3.12's weight gradient of a strided 1x1 channels-last convolution with few input
    channels writes past its buffer (uxlfoundation/oneDNN#6035): one thread aborted the process,
    two hung now and then. DownsampleConv steers around it; checked in a child process, which a
    relapse kills instead of the test worker. The child runs the class's source with torch
    alone (importing ``benchmarks`` would load jax as well: seconds)."""
    import inspect
    import subprocess
    import sys

    from benchmarks.torch_reference import DownsampleConv

    header = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n"
    child = header + inspect.getsource(DownsampleConv) + DOWNSAMPLE_BACKWARD
    result = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr[-2000:]
