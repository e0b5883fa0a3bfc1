"""Plain-jnp reference of the C-volution aggregation.

Every kernel in `kernels/` is tested against this function; `cvolution_jax.ops.aggregate`
validates its arguments and dispatches here for `impl="xla"`.

    out[b, i, j, c] = sum_{kh, kw} (Hd[b, i, j, c // 16, kh*K + kw] + S[kh*K + kw, c])
                                   * x_pad[b, s*i + kh*d, s*j + kw*d, c]

with `x_pad` zero-padded by `p = d*(K-1)/2` on both spatial sides and `Ho = ceil(H / s)`.
The sum over the K*K taps is written as K*K strided slices of `x_pad`, so XLA fuses it into
one pass and autodiff gives the gradients of the spec (a pad/slice transpose for `dx`).
"""

from __future__ import annotations

import jax.numpy as jnp

GROUP_CHANNELS = 16


def output_size(size: int, stride: int) -> int:
    """Spatial output size `ceil(size / stride)` of the aggregation (and of its generator)."""
    return -(-size // stride)


def aggregate(x, dynamic_kernel, static_kernel, *, kernel_size: int, stride: int, dilation: int):
    """Aggregates `x` with a per-pixel, per-group kernel plus an optional per-channel one.

    Args:
      x: `[B, H, W, C]`, C a multiple of 16.
      dynamic_kernel: `[B, Ho, Wo, G, K*K]` with `G = C // 16`, tap index `kh*K + kw`.
      static_kernel: `[K*K, C]` or None.
      kernel_size, stride, dilation: K, s, d (K odd).

    Returns:
      `[B, Ho, Wo, C]` in the dtype of `x`; products are accumulated in (at least) float32.
    """
    b, h, w, c = x.shape
    k, s, d = kernel_size, stride, dilation
    ho, wo = output_size(h, s), output_size(w, s)
    groups = c // GROUP_CHANNELS
    pad = d * (k - 1) // 2
    # Pad the far side up to what the last strided tap reads, so every slice below has Ho rows.
    pad_h = (pad, max(0, s * (ho - 1) + d * (k - 1) - pad - h + 1))
    pad_w = (pad, max(0, s * (wo - 1) + d * (k - 1) - pad - w + 1))
    x_pad = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    acc = jnp.promote_types(x.dtype, jnp.float32)  # bf16 accumulates in fp32; fp64 (tests) stays fp64
    # Per-tap pieces come from jnp.split, whose transpose is one concatenate: indexing tap k
    # instead would transpose to K*K zero-padded copies of the whole kernel in the backward pass.
    dynamic = jnp.split(dynamic_kernel.astype(acc), k * k, axis=-1)  # K*K x [B, Ho, Wo, G, 1]
    if static_kernel is not None:
        static = jnp.split(static_kernel.astype(acc).reshape(k * k, groups, GROUP_CHANNELS), k * k, axis=0)  # K*K x [1, G, 16]
    out = jnp.zeros((b, ho, wo, groups, GROUP_CHANNELS), acc)
    for kh in range(k):
        for kw in range(k):
            tap = x_pad[:, kh * d : kh * d + s * (ho - 1) + 1 : s, kw * d : kw * d + s * (wo - 1) + 1 : s, :]
            tap = tap.astype(acc).reshape(b, ho, wo, groups, GROUP_CHANNELS)
            weight = dynamic[kh * k + kw]  # shared by a group's 16 channels
            if static_kernel is not None:
                weight = weight + static[kh * k + kw]
            out = out + weight * tap
    return out.reshape(b, ho, wo, c).astype(x.dtype)
