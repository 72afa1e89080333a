"""An independent float64 NumPy re-statement of one MoCo training step, for tests only.

It restates the official MoCo (facebookresearch/moco ``builder.py`` + ``main_moco.py``) and the
official single-GPU demo's ``SplitBatchNorm`` for the tiny ``mlp`` backbone
(flatten -> Linear(no bias) ``fc1`` -> BN ``bn1`` -> ReLU) and the ``linear`` (``fc``) or ``mlp``
(``fc0`` -> ReLU -> ``fc2``) head, with every backward pass written by hand. No jax, no autograd:
the point is to check moco_jax's step against something that shares none of its machinery.

Parameters and running statistics use moco_jax's pytree layout (nested dicts with ``backbone`` /
``head`` at the top) so the two can be compared leaf by leaf.

BN "groups" are lists of global-batch row indices: every group is normalised with its own
statistics. The step's caller decides them (per device, per ``SplitBatchNorm`` split, or the whole
global batch for synchronised BN), which is where the BN modes differ.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - 0.1) * old + 0.1 * batch statistic


def tree_map(fn, *trees):
    """Map over nested dicts of arrays (enough for the parameter trees here)."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: tree_map(fn, *(t[key] for t in trees)) for key in first}
    return fn(*trees)


def tree_items(tree, prefix=""):
    """``(path, leaf)`` pairs of a nested dict, paths joined with ``/``."""
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from tree_items(tree[key], f"{prefix}/{key}" if prefix else key)
    else:
        yield prefix, tree


def finite_difference_check(params, loss_and_grads, eps=1e-6, atol=1e-7, rtol=1e-5):
    """Every leaf of ``loss_and_grads(params)[1]`` against central differences of its loss."""
    _, grads = loss_and_grads(params)
    analytic = dict(tree_items(grads))
    for path, leaf in tree_items(params):
        expected = np.zeros_like(leaf)
        for index in np.ndindex(leaf.shape):
            original = leaf[index]
            leaf[index] = original + eps
            plus, _ = loss_and_grads(params)
            leaf[index] = original - eps
            minus, _ = loss_and_grads(params)
            leaf[index] = original
            expected[index] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(analytic[path], expected, atol=atol, rtol=rtol, err_msg=path)


# --------------------------------------------------------------------------------------------
# Building blocks with hand-written backward passes.


def batch_norm_forward(h: np.ndarray, gamma, beta, groups: Sequence[np.ndarray]):
    """Training-mode BN of ``h [N, C]``, each index group normalised with its own statistics.

    Normalisation uses the biased variance; the returned per-group unbiased variances are what
    PyTorch folds into the running variance.
    """
    y = np.empty_like(h)
    xhat = np.empty_like(h)
    inv_std = np.empty_like(h)
    means, unbiased = [], []
    for idx in groups:
        g = h[idx]
        n = g.shape[0]
        mu = g.mean(axis=0)
        var = ((g - mu) ** 2).mean(axis=0)
        inv = 1.0 / np.sqrt(var + BN_EPS)
        xhat[idx] = (g - mu) * inv
        inv_std[idx] = inv
        y[idx] = xhat[idx] * gamma + beta
        means.append(mu)
        unbiased.append(var * n / (n - 1))
    cache = (xhat, inv_std, gamma, groups)
    return y, cache, np.mean(means, axis=0), np.mean(unbiased, axis=0)


def batch_norm_backward(dy: np.ndarray, cache):
    """Gradients of BN w.r.t. its input, scale and bias (batch statistics differentiated too)."""
    xhat, inv_std, gamma, groups = cache
    dgamma = np.sum(dy * xhat, axis=0)
    dbeta = np.sum(dy, axis=0)
    dxhat = dy * gamma
    dx = np.empty_like(dy)
    for idx in groups:
        n = len(idx)
        d, xh = dxhat[idx], xhat[idx]
        dx[idx] = inv_std[idx] / n * (n * d - d.sum(axis=0) - xh * np.sum(d * xh, axis=0))
    return dx, dgamma, dbeta


def relu(x):
    return np.maximum(x, 0.0)


def l2_normalize(z: np.ndarray):
    norm = np.sqrt(np.sum(z * z, axis=1, keepdims=True))
    return z / norm, norm


def l2_normalize_backward(dq: np.ndarray, q: np.ndarray, norm: np.ndarray):
    """d(z/|z|) = (dq - q (q . dq)) / |z|."""
    return (dq - q * np.sum(q * dq, axis=1, keepdims=True)) / norm


def info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, temperature: float):
    """Mean cross-entropy of ``[q.k, q.queue^T] / T`` with label 0, and its gradient w.r.t. q.

    Returns ``(loss, per_example_loss, logits, dloss/dq)``.
    """
    logits = np.concatenate([np.sum(q * k, axis=1, keepdims=True), q @ queue.T], axis=1)
    logits = logits / temperature
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.sum(np.exp(shifted), axis=1))
    per_example = log_z - shifted[:, 0]
    n = q.shape[0]
    dlogits = np.exp(shifted - log_z[:, None])
    dlogits[:, 0] -= 1.0
    dlogits /= n * temperature
    dq = dlogits[:, :1] * k + dlogits[:, 1:] @ queue
    return per_example.mean(), per_example, logits, dq


# --------------------------------------------------------------------------------------------
# The encoder: mlp backbone + linear / mlp head.


def encoder_forward(params, x: np.ndarray, groups):
    """``x [N, H, W, C]`` -> (unnormalised embedding, cache, BN batch mean, BN unbiased var)."""
    bb, head = params["backbone"], params["head"]
    flat = x.reshape(x.shape[0], -1)
    h = flat @ bb["fc1"]["kernel"]
    a, bn_cache, mean, var = batch_norm_forward(h, bb["bn1"]["scale"], bb["bn1"]["bias"], groups)
    feat = relu(a)
    cache = {"flat": flat, "bn": bn_cache, "a": a, "feat": feat}
    if "fc" in head:
        z = feat @ head["fc"]["kernel"] + head["fc"]["bias"]
    else:
        pre = feat @ head["fc0"]["kernel"] + head["fc0"]["bias"]
        hidden = relu(pre)
        cache.update(pre=pre, hidden=hidden)
        z = hidden @ head["fc2"]["kernel"] + head["fc2"]["bias"]
    return z, cache, mean, var


def encoder_backward(params, cache, dz: np.ndarray):
    """Gradients of all parameters given dL/d(embedding)."""
    head = params["head"]
    grads = {"backbone": {}, "head": {}}
    if "fc" in head:
        grads["head"]["fc"] = {"kernel": cache["feat"].T @ dz, "bias": dz.sum(axis=0)}
        dfeat = dz @ head["fc"]["kernel"].T
    else:
        grads["head"]["fc2"] = {"kernel": cache["hidden"].T @ dz, "bias": dz.sum(axis=0)}
        dhidden = dz @ head["fc2"]["kernel"].T
        dpre = dhidden * (cache["pre"] > 0)
        grads["head"]["fc0"] = {"kernel": cache["feat"].T @ dpre, "bias": dpre.sum(axis=0)}
        dfeat = dpre @ head["fc0"]["kernel"].T
    da = dfeat * (cache["a"] > 0)
    dh, dgamma, dbeta = batch_norm_backward(da, cache["bn"])
    grads["backbone"]["bn1"] = {"scale": dgamma, "bias": dbeta}
    grads["backbone"]["fc1"] = {"kernel": cache["flat"].T @ dh}
    return grads


# --------------------------------------------------------------------------------------------
# BN groups and the Shuffle-BN permutation, in global-batch row indices.


def split_groups(num_devices: int, per_device: int, group_size: int):
    """Per-device BN groups; inside a device row ``i`` is in split ``i % num_splits``.

    That is the layout of the official ``SplitBatchNorm``'s ``view(-1, C * num_splits, H, W)``.
    ``group_size == 0`` means one group per device.
    """
    splits = per_device // group_size if group_size else 1
    groups = []
    for d in range(num_devices):
        rows = d * per_device + np.arange(per_device)
        for s in range(splits):
            groups.append(rows[np.arange(per_device) % splits == s])
    return groups


def shuffle_bn_permutation(
    sends: Sequence[np.ndarray], receives: Sequence[np.ndarray], group: int | None = None
):
    """Global rows fed to the key encoder, device by device, for Shuffle-BN.

    The devices form groups of ``group`` consecutive devices (default: one group of all ``n``).
    Device ``d`` permutes its ``b`` images by ``sends[d]`` and sends chunk ``j`` (``b / group``
    rows) to device ``j`` of its group; each device concatenates what it got in source-device
    order and permutes it by its ``receives``. Position ``p`` of the result holds global row
    ``perm[p]``.
    """
    n = len(sends)
    g = n if group is None else group
    b = len(sends[0])
    c = b // g
    perm = []
    for device in range(n):
        first, j = device - device % g, device % g
        received = np.concatenate(
            [d * b + np.asarray(sends[d])[j * c : (j + 1) * c] for d in range(first, first + g)]
        )
        perm.append(received[np.asarray(receives[device])])
    return np.concatenate(perm)


# --------------------------------------------------------------------------------------------
# The training step.


class MoCoReference:
    """MoCo state and step: momentum encoder, queue, SGD with coupled weight decay."""

    def __init__(
        self,
        params,
        batch_stats,
        queue,
        *,
        momentum: float,
        temperature: float,
        weight_decay: float,
        sgd_momentum: float,
    ):
        f64 = lambda a: np.array(a, dtype=np.float64)
        self.params = tree_map(f64, params)
        self.batch_stats = tree_map(f64, batch_stats)
        self.ema_params = copy.deepcopy(self.params)  # the reference copies q's init into k
        self.ema_batch_stats = copy.deepcopy(self.batch_stats)
        self.buf = None  # SGD momentum buffers; created at the first step as in PyTorch
        self.queue = f64(queue)
        self.queue_ptr = 0
        self.m = momentum
        self.t = temperature
        self.wd = weight_decay
        self.sgd_momentum = sgd_momentum

    @staticmethod
    def _update_running(stats, mean, var):
        bn = stats["backbone"]["bn1"]
        bn["mean"] = (1 - BN_MOMENTUM) * bn["mean"] + BN_MOMENTUM * mean
        bn["var"] = (1 - BN_MOMENTUM) * bn["var"] + BN_MOMENTUM * var

    def step(self, images_q, images_k, lr, query_groups, key_perm, key_groups):
        """One step; ``key_perm`` (global rows) is the order the key encoder sees the key view.

        Returns a dict with the loss and the (unshuffled) keys and queries.
        """
        self._momentum_update()
        k = self._keys(images_k, key_perm, key_groups)
        loss, per_example, logits, q, grads = self._queries(images_q, k, query_groups)
        self._sgd(grads, lr)
        self._enqueue(k)
        return {"loss": loss, "per_example": per_example, "logits": logits, "q": q, "k": k}

    def symmetric_step(self, images_1, images_2, lr, query_groups, key_perms, key_groups):
        """The official colab's symmetric step: ``ctr(q1, k2) + ctr(q2, k1)`` against the old
        queue, then ``[k1; k2]`` enqueued. ``key_perms``: the key encoder's order of view 2, then
        of view 1 (it sees them in that order). Returns the loss and both terms' logits.
        """
        self._momentum_update()
        k2 = self._keys(images_2, key_perms[0], key_groups)
        k1 = self._keys(images_1, key_perms[1], key_groups)
        loss_12, _, logits_12, _, grads_12 = self._queries(images_1, k2, query_groups)
        loss_21, _, logits_21, _, grads_21 = self._queries(images_2, k1, query_groups)
        self._sgd(tree_map(np.add, grads_12, grads_21), lr)
        self._enqueue(np.concatenate([k1, k2]))
        return {"loss": loss_12 + loss_21, "logits": np.concatenate([logits_12, logits_21])}

    def _momentum_update(self):
        """1. Momentum update of the key encoder, before the query encoder's update."""
        self.ema_params = tree_map(
            lambda e, p: self.m * e + (1 - self.m) * p, self.ema_params, self.params
        )

    def _keys(self, images, perm, groups):
        """2. Keys: shuffled batch through the key encoder, normalised, un-shuffled. The key
        encoder's BN running statistics come from this forward pass."""
        images = np.asarray(images, np.float64)
        z_k, _, mean_k, var_k = encoder_forward(self.ema_params, images[perm], groups)
        k_shuffled, _ = l2_normalize(z_k)
        k = np.empty_like(k_shuffled)
        k[perm] = k_shuffled
        self._update_running(self.ema_batch_stats, mean_k, var_k)
        return k

    def _queries(self, images, k, groups):
        """3. Queries and InfoNCE against the queue as it was before this step; gradients."""
        images = np.asarray(images, np.float64)
        z_q, cache, mean_q, var_q = encoder_forward(self.params, images, groups)
        q, norm = l2_normalize(z_q)
        loss, per_example, logits, dq = info_nce(q, k, self.queue, self.t)
        self._update_running(self.batch_stats, mean_q, var_q)
        grads = encoder_backward(self.params, cache, l2_normalize_backward(dq, q, norm))
        return loss, per_example, logits, q, grads

    def _sgd(self, grads, lr):
        """4. torch.optim.SGD: g += wd p; buf = mom buf + g (buf = g at first); p -= lr buf."""
        grads = tree_map(lambda g, p: g + self.wd * p, grads, self.params)
        if self.buf is None:
            self.buf = tree_map(np.copy, grads)
        else:
            self.buf = tree_map(lambda b, g: self.sgd_momentum * b + g, self.buf, grads)
        self.params = tree_map(lambda p, b: p - lr * b, self.params, self.buf)

    def _enqueue(self, k):
        """5. Dequeue and enqueue, wrapping past the end of the queue."""
        size = self.queue.shape[0]
        rows = (self.queue_ptr + np.arange(k.shape[0])) % size
        self.queue[rows] = k
        self.queue_ptr = (self.queue_ptr + k.shape[0]) % size
