"""The resize of a view's crop window, on the device (``dataset.resize_on = "device"``).

With this the host stops at decoding: per image it sends the decoded union of the views'
windows, padded into a fixed ``B x B`` buffer (``dataset.union_buffer``), and each view's window
as a box ``[top, left, h, w]`` inside it (``host_crops.crop_steps``). Here each window is cut
out and resized to ``S x S`` exactly as the host does it (``host_crops._resize``, PIL's
bilinear): a triangle filter widened by the scale factor when shrinking, over the window's own
pixels only (weights renormalised at the window's edges, so pixels beside it never leak in),
with float32 sums, rounded to uint8 values. A box of ``S x S`` is therefore returned unchanged,
pixel for pixel: that is how the host sends views it already resized (unions larger than the
buffer).

The filter is separable: a view is ``Wy @ window @ Wx^T`` per channel, with ``Wy`` and ``Wx``
``[S, B]`` weight matrices built from the box: two matmuls per view, in 2 and 3 bf16 parts
(see ``resize_window``): 3.4 GFLOP an image of two views at ``S = 224``, ``B = 640`` by the TPU
compiler's count, ~10% of a MoCo v2 ResNet-50 step's ~32 GFLOP an image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def axis_weights(start: jax.Array, length: jax.Array, size: int, extent: int) -> jax.Array:
    """``[size, extent]`` weights of the ``size`` outputs over positions ``0 .. extent - 1`` for
    the window ``[start, start + length)`` of one axis (PIL's ``precompute_coeffs``, bilinear).

    Output ``i`` samples the window at ``(i + 0.5) * length / size``; input pixel ``j`` (centre
    ``j + 0.5``) weighs ``max(0, 1 - |distance| / support)`` with ``support = max(length / size,
    1)``, zero outside the window; each row sums to 1."""
    length = length.astype(jnp.float32)
    scale = length / size
    support = jnp.maximum(scale, 1.0)
    centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) * scale
    pixels = jnp.arange(extent, dtype=jnp.float32) - start.astype(jnp.float32) + 0.5
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels[None, :] - centres[:, None]) / support)
    inside = (pixels > 0) & (pixels < length)
    weights = jnp.where(inside[None, :], weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _bf16_parts(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A float32 array as a bf16 head and the bf16 rounding of what is left. The head is
    rounded by ``reduce_precision``, not by a bf16 round trip: XLA's GPU pipeline folds
    ``f32 -> bf16 -> f32`` back into ``x`` (excess precision allowed), which would make
    every tail zero there."""
    head = jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    return head.astype(jnp.bfloat16), (x - head).astype(jnp.bfloat16)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def resize_window(buffer: jax.Array, box: jax.Array, size: int) -> jax.Array:
    """``[S, S, C]`` uint8: the window ``box = [top, left, h, w]`` of a ``[B, B, C]`` uint8
    ``buffer`` resized to ``size x size`` (see the module docstring)."""
    rows = axis_weights(box[0], box[2], size, buffer.shape[0])
    cols = axis_weights(box[1], box[3], size, buffer.shape[1])
    # bf16 matmuls with float32 sums, the same arithmetic on every backend (what the tests
    # check on a CPU is what a TPU's MXU computes): uint8 values are exact in bf16, and a
    # float32 array split into a bf16 head and tail carries 16 bits (0.004 levels here). Rows:
    # weights (head + tail) x pixels, 2 products; columns: the rows pass's result x weights,
    # 3 (tail x tail is below the precision). A third of float32 HIGHEST's 6 passes on a TPU.
    pixels = buffer.astype(jnp.bfloat16)
    tall = sum(_dot("ij,jlc->ilc", part, pixels) for part in _bf16_parts(rows))
    (tall_head, tall_tail), (cols_head, cols_tail) = _bf16_parts(tall), _bf16_parts(cols)
    view = sum(
        _dot("ilc,kl->ikc", a, b)
        for a, b in ((tall_head, cols_head), (tall_head, cols_tail), (tall_tail, cols_head))
    )
    return jnp.clip(jnp.round(view), 0, 255).astype(jnp.uint8)


def resize_windows(buffers: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """``[N, S, S, C]`` uint8 views of ``[N, B, B, C]`` buffers and their ``[N, 4]`` boxes."""
    return jax.vmap(lambda buffer, box: resize_window(buffer, box, size))(buffers, boxes)
