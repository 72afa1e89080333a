"""An independent float64 NumPy re-statement of one MoCo v3 training step, for tests only.

It restates moco-v3 (facebookresearch/moco-v3 ``moco/builder.py``, ``main_moco.py``,
``moco/optimizer.py`` and ``torch.optim.AdamW``) for the tiny ``mlp`` backbone (flatten ->
Linear(no bias) ``fc1`` -> BN ``bn1`` -> ReLU) with the v3 projector and predictor
(``_build_mlp``: bias-free Linears, Linear-BN-ReLU between them, a BN without affine after the
last one where ``last_bn``), with every backward pass written by hand. No jax, no autograd.

The step works on the global batch: row ``g`` of view 1's queries is positive with row ``g`` of
view 2's gathered keys (on device r, row i is ``g = i + N * r``). BN "groups" are lists of
global row indices normalised together: the whole batch for synchronised BN, one per device
otherwise. Parameters and running statistics use moco_jax's pytree layout (``backbone``,
``head`` = projector, ``predictor``) so the two compare leaf by leaf.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from numpy_moco import (
    BN_MOMENTUM,
    batch_norm_backward,
    batch_norm_forward,
    l2_normalize,
    l2_normalize_backward,
    relu,
    tree_map,
)

# (projector layers, projector last BN, predictor layers, predictor last BN), as builder.py's
# MoCo_ResNet and MoCo_ViT.
LAYOUTS = {"v3_resnet": (2, True, 2, False), "v3_vit": (3, True, 2, True)}
ADAM_EPS = 1e-8


def warmup_cosine_lr(peak: float, step: int, steps_per_epoch: int, epochs: int, warmup: int):
    """main_moco.py's ``adjust_learning_rate`` at the fractional epoch ``step / iters``."""
    epoch = step / steps_per_epoch
    if epoch < warmup:
        return peak * epoch / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def cosine_momentum(m0: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """main_moco.py's ``adjust_moco_momentum`` at the fractional epoch."""
    epoch = step / steps_per_epoch
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m0)


# --------------------------------------------------------------------------------------------
# The networks, forward and backward.


def _update_running(stats, name, mean, var):
    stats[name]["mean"] = (1 - BN_MOMENTUM) * stats[name]["mean"] + BN_MOMENTUM * mean
    stats[name]["var"] = (1 - BN_MOMENTUM) * stats[name]["var"] + BN_MOMENTUM * var


def mlp_forward(params, stats, x, num_layers: int, last_bn: bool, groups):
    """``_build_mlp`` forward; updates ``stats`` (running statistics) in place."""
    cache = []
    for layer in range(num_layers):
        last = layer == num_layers - 1
        linear, bn = f"fc{3 * layer}", f"fc{3 * layer + 1}"
        h = x @ params[linear]["kernel"]
        entry = {"input": x, "linear": linear}
        if not last or last_bn:
            affine = not last
            width = h.shape[1]
            gamma = params[bn]["scale"] if affine else np.ones(width)
            beta = params[bn]["bias"] if affine else np.zeros(width)
            h, bn_cache, mean, var = batch_norm_forward(h, gamma, beta, groups)
            _update_running(stats, bn, mean, var)
            entry.update(bn=bn, bn_cache=bn_cache, affine=affine)
        if not last:
            entry["pre_relu"] = h
            h = relu(h)
        cache.append(entry)
        x = h
    return x, cache


def mlp_backward(params, cache, dy):
    """Gradients of ``_build_mlp``'s parameters given dL/d(output); returns (grads, dL/dx)."""
    grads = {}
    for entry in reversed(cache):
        if "pre_relu" in entry:
            dy = dy * (entry["pre_relu"] > 0)
        if "bn" in entry:
            dy, dgamma, dbeta = batch_norm_backward(dy, entry["bn_cache"])
            if entry["affine"]:
                grads[entry["bn"]] = {"scale": dgamma, "bias": dbeta}
        grads[entry["linear"]] = {"kernel": entry["input"].T @ dy}
        dy = dy @ params[entry["linear"]]["kernel"].T
    return grads, dy


def backbone_forward(params, stats, images, groups):
    flat = images.reshape(images.shape[0], -1)
    h = flat @ params["fc1"]["kernel"]
    a, bn_cache, mean, var = batch_norm_forward(
        h, params["bn1"]["scale"], params["bn1"]["bias"], groups
    )
    _update_running(stats, "bn1", mean, var)
    return relu(a), {"flat": flat, "a": a, "bn": bn_cache}


def backbone_backward(params, cache, dfeat):
    dh, dgamma, dbeta = batch_norm_backward(dfeat * (cache["a"] > 0), cache["bn"])
    return {"fc1": {"kernel": cache["flat"].T @ dh}, "bn1": {"scale": dgamma, "bias": dbeta}}


def contrastive(q, k, temperature):
    """``2 T * CE(normalize(q) normalize(k)^T / T, arange)``, its gradient w.r.t. q, logits."""
    qn, q_norm = l2_normalize(q)
    kn, _ = l2_normalize(k)
    logits = qn @ kn.T / temperature
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.sum(np.exp(shifted), axis=1))
    n = q.shape[0]
    per_example = log_z - shifted[np.arange(n), np.arange(n)]
    dlogits = np.exp(shifted - log_z[:, None])
    dlogits[np.arange(n), np.arange(n)] -= 1.0
    dlogits *= 2.0 * temperature / (n * temperature)
    dq = l2_normalize_backward(dlogits @ kn, qn, q_norm)
    return 2.0 * temperature * per_example.mean(), dq, logits


# --------------------------------------------------------------------------------------------
# The training step.


class MoCoV3Reference:
    """moco-v3's model and optimizer: base encoder, predictor, momentum encoder, LARS/AdamW."""

    def __init__(self, params, batch_stats, *, layout, temperature, optimizer, weight_decay,
                 momentum=0.9, betas=(0.9, 0.999)):  # fmt: skip
        f64 = lambda a: np.array(a, dtype=np.float64)
        self.params = tree_map(f64, params)
        self.batch_stats = tree_map(f64, batch_stats)
        encoder = lambda tree: {k: copy.deepcopy(tree[k]) for k in ("backbone", "head")}
        self.ema_params = encoder(self.params)  # builder.py copies the base encoder's init
        self.ema_batch_stats = encoder(self.batch_stats)
        self.proj_layers, self.proj_last_bn, self.pred_layers, self.pred_last_bn = LAYOUTS[layout]
        self.t = temperature
        self.optimizer, self.wd, self.momentum, self.betas = (
            optimizer,
            weight_decay,
            momentum,
            betas,
        )
        self.mu = tree_map(np.zeros_like, self.params)  # LARS 'mu' / AdamW exp_avg
        self.nu = tree_map(np.zeros_like, self.params)  # AdamW exp_avg_sq
        self.count = 0

    def _encoder(self, params, stats, images, groups):
        feat, bb_cache = backbone_forward(params["backbone"], stats["backbone"], images, groups)
        z, head_cache = mlp_forward(
            params["head"], stats["head"], feat, self.proj_layers, self.proj_last_bn, groups
        )
        return z, (bb_cache, head_cache)

    def _online(self, images, groups):
        z, enc_cache = self._encoder(self.params, self.batch_stats, images, groups)
        q, pred_cache = mlp_forward(
            self.params["predictor"], self.batch_stats["predictor"], z, self.pred_layers,
            self.pred_last_bn, groups,
        )  # fmt: skip
        return q, (enc_cache, pred_cache)

    def _online_backward(self, cache, dq):
        (bb_cache, head_cache), pred_cache = cache
        grads = {}
        grads["predictor"], dz = mlp_backward(self.params["predictor"], pred_cache, dq)
        grads["head"], dfeat = mlp_backward(self.params["head"], head_cache, dz)
        grads["backbone"] = backbone_backward(self.params["backbone"], bb_cache, dfeat)
        return grads

    def step(self, x1, x2, lr, m, groups):
        """One step of main_moco.py's loop; returns the loss and the logits of both terms."""
        x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
        # builder.py's forward: queries of both views (BN statistics: view 1, then view 2) ...
        q1, cache1 = self._online(x1, groups)
        q2, cache2 = self._online(x2, groups)
        # ... the momentum update, then the keys from the updated momentum encoder.
        self.ema_params = tree_map(lambda e, p: m * e + (1 - m) * p, self.ema_params,
                                   {k: self.params[k] for k in ("backbone", "head")})  # fmt: skip
        k1, _ = self._encoder(self.ema_params, self.ema_batch_stats, x1, groups)
        k2, _ = self._encoder(self.ema_params, self.ema_batch_stats, x2, groups)
        loss1, dq1, logits1 = contrastive(q1, k2, self.t)
        loss2, dq2, logits2 = contrastive(q2, k1, self.t)
        grads = tree_map(
            lambda a, b: a + b,
            self._online_backward(cache1, dq1),
            self._online_backward(cache2, dq2),
        )
        self._optimizer_step(grads, lr)
        return {"loss": loss1 + loss2, "logits": (logits1, logits2)}

    def _optimizer_step(self, grads, lr):
        self.count += 1
        if self.optimizer == "lars":  # moco/optimizer.py

            def update(p, g, mu):
                if p.ndim > 1:
                    g = g + self.wd * p
                    p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
                    if p_norm > 0 and g_norm > 0:
                        g = g * (0.001 * p_norm / g_norm)
                mu[...] = self.momentum * mu + g
                return p - lr * mu

            self.params = tree_map(update, self.params, grads, self.mu)
        else:  # torch.optim.AdamW
            b1, b2 = self.betas
            t = self.count

            def update(p, g, mu, nu):
                p = p * (1 - lr * self.wd)
                mu[...] = b1 * mu + (1 - b1) * g
                nu[...] = b2 * nu + (1 - b2) * g * g
                denom = np.sqrt(nu) / math.sqrt(1 - b2**t) + ADAM_EPS
                return p - lr / (1 - b1**t) * mu / denom

            self.params = tree_map(update, self.params, grads, self.mu, self.nu)
