"""moco_jax's whole training step against an independent float64 NumPy re-statement of MoCo.

The reference (``tests/numpy_moco.py``) restates the official algorithm with hand-written
backward passes and no jax; these tests feed both the same initial weights and images and
compare everything the step produces, for every BN mode and both heads, over several steps (so
the queue wraps, the lr changes and the SGD momentum buffer is used).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpy_moco as ref
from moco_jax import build
from moco_jax.algorithms.info_nce import info_nce, l2_normalize, moco_logits
from moco_jax.algorithms.shuffle_bn import shuffle_permutations
from moco_jax.config.defaults import base_config
from moco_jax.mesh import shard_batch

ATOL = RTOL = 1e-5
NUM_STEPS = 3
STEPS_PER_EPOCH = 1  # the per-epoch cosine schedule then changes the lr at every step
EPOCHS = 4
PEAK_LR = 0.5
WEIGHT_DECAY = 0.01
SGD_MOMENTUM = 0.9
EMA_MOMENTUM = 0.9
TEMPERATURE = 0.2

# name: (devices, bn_mode, bn_group_size, global batch, K, image shape). K is never a multiple of
# the global batch, so the queue wraps within three steps.
CASES = {
    "shuffle-1dev-2groups": (1, "shuffle", 4, 8, 20, (6, 6, 2)),
    "sync-8dev": (8, "sync", 0, 16, 40, (4, 4, 1)),
    "local-8dev": (8, "local", 0, 32, 72, (4, 4, 1)),
    "shuffle-8dev-2groups": (8, "shuffle", 4, 64, 100, (4, 4, 1)),
    # moco.symmetric (the colab's symmetric loss): 2 x 64 keys per step into K = 200
    "symmetric-shuffle-8dev-2groups": (8, "shuffle", 4, 64, 200, (4, 4, 1)),
    # Shuffle-BN within groups of 2 devices (model.shuffle_group_devices)
    "shuffle-8dev-in-pairs": (8, "shuffle", 0, 64, 100, (4, 4, 1)),
}
SHUFFLE_GROUPS = {"shuffle-8dev-in-pairs": 2}  # devices per Shuffle-BN group; others: all
HEADS = ("linear", "mlp")
# Every case with both heads, but the symmetric loss and the grouped shuffle with the MLP head
# only (the heads do not change what they add).
ONE_HEAD = ("symmetric-shuffle-8dev-2groups", "shuffle-8dev-in-pairs")
CASE_HEADS = [(c, h) for c in CASES if c not in ONE_HEAD for h in HEADS] + [
    (c, "mlp") for c in ONE_HEAD
]

MAX_DIFFS: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_max_diffs():
    """Prints the largest |moco_jax - reference| per quantity (visible with ``pytest -s``)."""
    yield
    if MAX_DIFFS:
        print("\nmax |moco_jax - numpy reference| over all cases and steps:")
        for name, (diff, scale) in sorted(MAX_DIFFS.items()):
            print(f"  {name:28s} {diff:.2e}  (largest |reference| there {scale:.2e})")


def _compare(name: str, actual, expected, atol: float = ATOL, rtol: float = RTOL) -> None:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    diff = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    if diff > MAX_DIFFS.get(name, (0.0,))[0]:
        MAX_DIFFS[name] = (diff, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=name)


def _compare_tree(name: str, actual, expected) -> None:
    actual = dict(ref.tree_items(jax.device_get(actual)))
    expected = dict(ref.tree_items(expected))
    assert actual.keys() == expected.keys(), (name, actual.keys(), expected.keys())
    for path in expected:
        _compare(f"{name}/{path}", actual[path], expected[path])


def _momentum_buffer(opt_state):
    """The ``trace`` (SGD momentum buffer) inside the optax state."""
    is_trace = lambda x: isinstance(x, optax.TraceState)
    nodes = [x for x in jax.tree.leaves(opt_state, is_leaf=is_trace) if is_trace(x)]
    assert len(nodes) == 1, nodes
    return nodes[0].trace


def _config(num_devices, bn_mode, group_size, batch, queue_size, image_shape, head):
    config = base_config()
    config.batch_size = batch
    config.epochs = EPOCHS
    config.num_devices = num_devices
    config.dataset.image_size = image_shape[0]
    config.dataset.num_channels = image_shape[2]
    config.dataset.mean = (0.5,) * image_shape[2]  # one per channel (the set-up validates it)
    config.dataset.std = (0.25,) * image_shape[2]
    config.model.backbone = "mlp"
    config.model.width_multiplier = 0.125  # hidden width 8
    config.model.head = head
    config.model.dim = 6
    config.model.bn_mode = bn_mode
    config.model.bn_group_size = group_size
    config.moco.queue_size = queue_size
    config.moco.momentum = EMA_MOMENTUM
    config.moco.temperature = TEMPERATURE
    config.optim.base_lr = PEAK_LR * 256 / batch
    config.optim.momentum = SGD_MOMENTUM
    config.optim.weight_decay = WEIGHT_DECAY
    config.optim.schedule = "cosine"
    config.optim.lr_milestones = ()
    return config


def _reference_lr(step: int) -> float:
    """``main_moco.adjust_learning_rate`` with ``--cos``: per epoch, epochs counted from 0."""
    epoch = step // STEPS_PER_EPOCH
    return PEAK_LR * 0.5 * (1.0 + math.cos(math.pi * epoch / EPOCHS))


@pytest.mark.parametrize("case,head", CASE_HEADS)
def test_train_step_matches_numpy_reference(case, head):
    """Three steps of moco_jax == three steps of the NumPy MoCo, quantity by quantity.

    Covers the momentum update before the gradient step, Shuffle-BN (permutation and
    un-permutation, across devices and within ``SplitBatchNorm``-style groups), synchronised and
    per-device BN (statistics, running statistics and their gradients), InfoNCE against the
    pre-enqueue queue, SGD with coupled weight decay and momentum under a changing lr, and the
    wrapping enqueue of all devices' keys in device order; and the symmetric loss (both views
    as queries and keys, each key view with its own shuffle, both views' keys enqueued).
    """
    num_devices, bn_mode, group_size, batch, queue_size, image_shape = CASES[case]
    per_device = batch // num_devices
    symmetric = case.startswith("symmetric")
    config = _config(num_devices, bn_mode, group_size, batch, queue_size, image_shape, head)
    config.moco.symmetric = symmetric
    shuffle_group = SHUFFLE_GROUPS.get(case, num_devices)
    config.model.shuffle_group_devices = shuffle_group
    built = build(config, STEPS_PER_EPOCH, devices=jax.devices()[:num_devices])
    mesh = built.mesh
    state = built.initial_state(7)
    train_step = built.algorithm.train_step

    init = jax.device_get(state)
    model = ref.MoCoReference(
        init.params,
        init.batch_stats,
        init.queue,
        momentum=EMA_MOMENTUM,
        temperature=TEMPERATURE,
        weight_decay=WEIGHT_DECAY,
        sgd_momentum=SGD_MOMENTUM,
    )
    # The reference starts the key encoder as a copy of the query encoder; so must moco_jax.
    _compare_tree("initial ema_params", init.ema_params, model.ema_params)
    _compare_tree("initial ema_batch_stats", init.ema_batch_stats, model.ema_batch_stats)
    rng = jax.random.wrap_key_data(np.asarray(jax.random.key_data(init.rng)))

    if bn_mode == "sync":
        query_groups = [np.arange(batch)]
    else:
        query_groups = ref.split_groups(num_devices, per_device, group_size)
    # Key BN groups index positions of the (shuffled) batch the key encoder sees: same layout.
    key_groups = query_groups

    data = np.random.default_rng(0)
    for step in range(NUM_STEPS):
        images_q = data.normal(size=(batch, *image_shape)).astype(np.float32)
        images_k = data.normal(size=(batch, *image_shape)).astype(np.float32)

        # The random draw of Shuffle-BN is the only thing taken from jax.
        rng, shuffle_rng = jax.random.split(rng)
        # symmetric: the key encoder sees view 2, then view 1, each shuffled with its own key
        shuffle_rngs = jax.random.split(shuffle_rng) if symmetric else [shuffle_rng]
        key_perms = [
            _key_permutation(r, bn_mode, num_devices, per_device, shuffle_group)
            for r in shuffle_rngs
        ]

        lr = _reference_lr(step)
        if symmetric:
            out = model.symmetric_step(images_q, images_k, lr, query_groups, key_perms, key_groups)
        else:
            out = model.step(images_q, images_k, lr, query_groups, key_perms[0], key_groups)
        state, metrics = train_step(state, shard_batch(mesh, images_q), shard_batch(mesh, images_k))
        metrics = jax.device_get(metrics)

        _compare("loss", metrics["loss"], out["loss"])
        _compare("learning_rate", metrics["learning_rate"], lr)
        _compare(
            "positive_similarity",
            metrics["positive_similarity"],
            np.mean(out["logits"][:, 0]) * TEMPERATURE,
        )
        _compare(
            "negative_similarity",
            metrics["negative_similarity"],
            np.mean(out["logits"][:, 1:]) * TEMPERATURE,
        )
        _compare("top1", metrics["top1"], np.mean(np.argmax(out["logits"], axis=1) == 0))
        ema_distance = math.sqrt(
            sum(
                np.sum((e - p) ** 2)
                for (_, e), (_, p) in zip(
                    ref.tree_items(model.ema_params), ref.tree_items(model.params), strict=True
                )
            )
        )
        _compare("ema_distance", metrics["ema_distance"], ema_distance)
        _compare_tree("params", state.params, model.params)
        _compare_tree("momentum_buffer", _momentum_buffer(state.opt_state), model.buf)
        _compare_tree("ema_params", state.ema_params, model.ema_params)
        _compare_tree("batch_stats", state.batch_stats, model.batch_stats)
        _compare_tree("ema_batch_stats", state.ema_batch_stats, model.ema_batch_stats)
        _compare("queue", state.queue, model.queue)
        assert int(state.queue_ptr) == model.queue_ptr == int(metrics["queue_ptr"])
        assert int(state.step) == step + 1
        np.testing.assert_array_equal(
            jax.random.key_data(state.rng), jax.random.key_data(rng), err_msg="rng"
        )
    # Three steps of `batch` keys (twice that if symmetric) into a queue of K rows that is not a
    # multiple of them: the last enqueue wrapped past the end.
    enqueued = NUM_STEPS * batch * (2 if symmetric else 1)
    assert model.queue_ptr == enqueued % queue_size
    assert enqueued > queue_size


def _key_permutation(shuffle_rng, bn_mode, num_devices, per_device, group):
    """The global rows in the order the key encoder sees them (Shuffle-BN's draw from jax),
    shuffled within groups of ``group`` devices."""
    batch = num_devices * per_device
    if bn_mode != "shuffle":
        return np.arange(batch)
    perms = [shuffle_permutations(shuffle_rng, d, per_device) for d in range(num_devices)]
    key_perm = ref.shuffle_bn_permutation(
        [np.asarray(s) for s, _ in perms], [np.asarray(r) for _, r in perms], group
    )
    assert sorted(key_perm) == list(range(batch))
    if num_devices > 1:  # every device's BN batch mixes images from all devices of its group
        for d in range(num_devices):
            sources = key_perm[d * per_device : (d + 1) * per_device] // per_device
            first = d - d % group
            assert sorted(set(sources.tolist())) == list(range(first, first + group))
    return key_perm


def test_info_nce_matches_numpy_formula():
    """moco_logits + info_nce (and their gradient) equal the cross-entropy written by hand.

    Pins the layout (positive in column 0, then the queue in order), the division by T, and
    that the loss is a per-example cross-entropy with label 0.
    """
    rng = np.random.default_rng(1)
    n, dim, size, temperature = 5, 7, 11, 0.07
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    q = unit(rng.normal(size=(n, dim)))
    k = unit(rng.normal(size=(n, dim)))
    queue = unit(rng.normal(size=(size, dim)))

    logits = moco_logits(
        jnp.asarray(q, jnp.float32),
        jnp.asarray(k, jnp.float32),
        jnp.asarray(queue, jnp.float32),
        temperature,
    )
    expected_logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1)
    expected_logits /= temperature
    _compare("info_nce logits", logits, expected_logits)

    per_example = info_nce(logits)
    expected = np.log(np.sum(np.exp(expected_logits), 1)) - expected_logits[:, 0]
    _compare("info_nce loss", per_example, expected)

    loss, _, _, dq = ref.info_nce(q, k, queue, temperature)
    _compare("info_nce mean loss", jnp.mean(per_example), loss)

    def mean_loss(q32):
        return jnp.mean(
            info_nce(
                moco_logits(
                    q32, jnp.asarray(k, jnp.float32), jnp.asarray(queue, jnp.float32), temperature
                )
            )
        )

    _compare("info_nce grad", jax.grad(mean_loss)(jnp.asarray(q, jnp.float32)), dq, atol=1e-4)
    # and l2_normalize is F.normalize
    z = rng.normal(size=(n, dim))
    _compare("l2_normalize", l2_normalize(jnp.asarray(z, jnp.float32)), unit(z))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_reference_gradients_match_finite_differences(head):
    """The hand-written backward passes of the reference are right on their own.

    Agreement with moco_jax alone cannot tell a shared mistake from a correct result, so the
    reference's gradient (through grouped BN, ReLU, the head, normalisation and InfoNCE) is
    checked against central differences in float64.
    """
    rng = np.random.default_rng(2)
    n, width, dim, size, temperature = 8, 5, 4, 9, 0.3
    image_shape = (2, 2, 3)
    d_in = int(np.prod(image_shape))
    params = {
        "backbone": {
            "fc1": {"kernel": rng.normal(size=(d_in, width))},
            "bn1": {"scale": 1 + 0.3 * rng.normal(size=width), "bias": rng.normal(size=width)},
        },
        "head": (
            {"fc": {"kernel": rng.normal(size=(width, dim)), "bias": rng.normal(size=dim)}}
            if head == "linear"
            else {
                "fc0": {"kernel": rng.normal(size=(width, width)), "bias": rng.normal(size=width)},
                "fc2": {"kernel": rng.normal(size=(width, dim)), "bias": rng.normal(size=dim)},
            }
        ),
    }
    x = rng.normal(size=(n, *image_shape))
    k, _ = ref.l2_normalize(rng.normal(size=(n, dim)))
    queue, _ = ref.l2_normalize(rng.normal(size=(size, dim)))
    groups = ref.split_groups(2, n // 2, 2)  # two devices of 4 rows, two splits each

    def loss_and_grads(p):
        z, cache, _, _ = ref.encoder_forward(p, x, groups)
        q, norm = ref.l2_normalize(z)
        loss, _, _, dq = ref.info_nce(q, k, queue, temperature)
        return loss, ref.encoder_backward(p, cache, ref.l2_normalize_backward(dq, q, norm))

    ref.finite_difference_check(params, loss_and_grads)


def test_untrained_loss_is_log_one_plus_k_once_queue_holds_own_keys():
    """With a fixed random encoder and unrelated q/k images, the loss is about log(1 + K).

    What is actually true: per example, loss = log(1 + K) + log(mean_j exp(l_j)) - l_0 over the
    1 + K logits. If the key comes from an image unrelated to the query's and the queue holds keys
    of the same encoder on the same distribution, the positive logit l_0 is exchangeable with the
    negatives, so E[l_0] = E[mean_j l_j] and E[loss] - log(1 + K) = E[log mean exp(l) - mean l],
    which is >= 0 (Jensen) and <= (2 / T)^2 / 8 = 0.5 for T = 1 (Hoeffding's lemma; cosine logits
    lie in [-1, 1]). So the loss lies in [log(1 + K), log(1 + K) + 0.5] up to batch noise.

    That only holds once the queue holds the model's own keys: the initial queue is random unit
    vectors, while an untrained encoder's keys share a common direction, so at first the positive
    stands out and the loss sits well below log(1 + K). The test checks both phases; the first one
    is what shows that the band is not met by accident (e.g. a queue never refreshed, or a
    positive computed from the query view, would both leave the loss below it).
    """
    batch, queue_size, image_shape = 64, 128, (4, 4, 1)
    config = _config(1, "local", 0, batch, queue_size, image_shape, "linear")
    config.moco.temperature = 1.0
    config.moco.momentum = 0.0  # the key encoder is the query encoder
    config.optim.base_lr = 1e-9  # the encoder stays (numerically) at its initialisation
    config.optim.weight_decay = 0.0
    config.optim.schedule = "constant"
    built = build(config, STEPS_PER_EPOCH, devices=jax.devices()[:1])
    mesh = built.mesh
    state = built.initial_state(3)
    train_step = built.algorithm.train_step

    data = np.random.default_rng(3)
    gaps, pos_minus_neg = [], []
    steps_to_fill = -(-queue_size // batch)
    for _ in range(steps_to_fill + 3):
        images_q = data.normal(size=(batch, *image_shape)).astype(np.float32)
        images_k = data.normal(size=(batch, *image_shape)).astype(np.float32)
        state, metrics = train_step(state, shard_batch(mesh, images_q), shard_batch(mesh, images_k))
        gaps.append(float(metrics["loss"]) - math.log(1 + queue_size))
        pos_minus_neg.append(
            float(metrics["positive_similarity"]) - float(metrics["negative_similarity"])
        )

    noise = 0.1  # batch-mean noise of l_0 - mean l over 64 examples is ~0.04
    upper = (2 / config.moco.temperature) ** 2 / 8
    # Queue made of the model's own keys only: positive like any negative, loss in the band.
    for gap, diff in zip(gaps[steps_to_fill:], pos_minus_neg[steps_to_fill:], strict=True):
        assert -noise < gap < upper, gaps
        assert abs(diff) < noise, pos_minus_neg
    # Random initial queue: the positive stands out and the loss is below the band.
    assert pos_minus_neg[0] > 2 * noise, pos_minus_neg
    assert gaps[0] < -noise, gaps
