"""BatchNorm with in-device groups and optional cross-device statistics.

MoCo needs BN that can imitate many small devices on one (the official single-GPU demo's
``SplitBatchNorm``) and BN whose statistics span the whole global batch (``sync`` mode). Flax's
``nn.BatchNorm`` does the latter but not the former, so this module does both.

Semantics follow PyTorch's ``F.batch_norm`` in training mode, which the reference uses:
normalisation with the biased batch variance, running variance updated with the unbiased one.
With ``num_groups > 1`` sample ``i`` belongs to group ``i % num_groups`` (the layout that the
official ``SplitBatchNorm``'s ``view(-1, C * num_splits, H, W)`` produces) and the running
statistics are updated with the mean over groups of the per-group statistics.

The batch variance is computed in one pass, ``E[x^2] - E[x]^2`` in float32 (as flax's
``BatchNorm`` does by default), on the activations shifted by one of their own samples so that
a large mean does not cancel the spread away: one read of the activations for both moments and, in
``sync`` mode, one collective, where the two-pass form read them twice (about 10% of the CPU
step). The NumPy float64 re-statement of the step checks the whole chain to 1e-5.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last (channels).

    Attributes:
      use_running_average: normalise with running statistics (evaluation), not the batch's.
      momentum: running-average decay; PyTorch's ``momentum=0.1`` is ``0.9`` here.
      epsilon: added to the variance (1e-5 as in torchvision).
      group_size: samples per BN group inside one device; 0 means the whole per-device batch.
      axis_name: mesh axis over which batch statistics are averaged (``sync`` mode), or None.
      dtype: dtype of the output; statistics are always computed in float32.
      scale_init: initialiser of the scale (zeros for zero-init residual branches).
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    group_size: int = 0
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)

        if self.use_running_average:
            inv = jax.lax.rsqrt(running_var.value + self.epsilon) * scale
            y = (x.astype(jnp.float32) - running_mean.value) * inv + bias
            return y.astype(self.dtype)

        batch = x.shape[0]
        group_size = self.group_size or batch
        if batch % group_size:
            raise ValueError(
                f"BatchNorm: per-device batch {batch} is not divisible by "
                f"bn_group_size {group_size}"
            )
        num_groups = batch // group_size
        # [group_size, num_groups, spatial, C]: sample i lands in group i % num_groups.
        xg = x.astype(jnp.float32).reshape(group_size, num_groups, -1, channels)
        # One pass over the activations for both moments (and one collective in sync mode),
        # shifted by a constant (exact in exact arithmetic) so that E[x^2] - E[x]^2 does not
        # cancel when the mean dwarfs the spread: one sample of each group and channel, or in
        # sync mode the running mean (it must be the same on every device; no extra collective).
        if self.axis_name is None:
            shift = jax.lax.stop_gradient(xg[0, :, 0, :])  # [num_groups, C]
        else:
            shift = jnp.broadcast_to(running_mean.value, (num_groups, channels))
        shifted = xg - shift[None, :, None, :]
        moments = jnp.stack([shifted.mean(axis=(0, 2)), jnp.square(shifted).mean(axis=(0, 2))])
        if self.axis_name is not None:
            moments = jax.lax.pmean(moments, self.axis_name)
        shifted_mean, mean_of_squares = moments[0], moments[1]  # [num_groups, C]
        var = jnp.maximum(mean_of_squares - jnp.square(shifted_mean), 0.0)  # biased
        mean = shifted_mean + shift  # [num_groups, C]
        count = group_size * xg.shape[2]
        if self.axis_name is not None:
            count *= jax.lax.axis_size(self.axis_name)

        # y = (x - mean) / std * scale + bias as one multiply-add per element.
        multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
        offset = bias - mean * multiplier
        y = xg * multiplier[None, :, None, :] + offset[None, :, None, :]
        y = y.reshape(x.shape)

        if not self.is_initializing():
            unbiased_var = var * (count / max(count - 1, 1))
            m = self.momentum
            running_mean.value = m * running_mean.value + (1 - m) * mean.mean(axis=0)
            running_var.value = m * running_var.value + (1 - m) * unbiased_var.mean(axis=0)
        return y.astype(self.dtype)
