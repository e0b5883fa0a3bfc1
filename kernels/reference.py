"""Plain-jnp aggregation of C-volution, its kernel-free backward, and the fused path's reference.

Every kernel in `kernels/` is tested against these functions; `cvolution_jax.ops` validates its
arguments and dispatches here for `impl="xla"` (CPU, TPU, and inputs the Pallas kernels do not take).

    out[b, i, j, c] = sum_{kh, kw} (Hd[b, i, j, c // 16, kh*K + kw] + S[kh*K + kw, c])
                                   * x_pad[b, s*i + kh*d, s*j + kw*d, c]

with `x_pad` zero-padded by `p = d*(K-1)/2` on both spatial sides and `Ho = ceil(H / s)`.
The forward is K*K strided slices of `x_pad`, which XLA fuses into one pass. Its backward
(`aggregate`'s custom VJP, the spec's "Gradients") is written the same way, as sums of shifted
slices, instead of XLA's autodiff of the slices (`aggregate_autodiff`, kept as the tests' oracle),
which transposes each tap to a zero-padded copy of `x` and was ~150x the forward on CPU:

- `dHd[.., g, t]` = the sum over the 16 channels of group g of `dout * x_tap_t`, one image at a
  time so the image stays in cache across the K*K taps;
- `dS[t, c]`      = the sum over batch and space of `dout * x_tap_t`;
- for both, `x_pad` is first split into its s*s stride phases (space-to-depth), so every tap
  reads a unit-stride window of one phase instead of a strided copy of `x_pad`;
- `dx` is a gather: input row `r` receives from output row `i` through tap row `kh` iff
  `s*i + kh*d = r + p`. Split by the phase `(r + p) mod s`, each phase is a stride-1 sum of
  shifted slices of `(Hd + S) * dout` over only the taps `kh*d = phase (mod s)`, so a stride-2
  `dx` does the forward's multiply-adds, not s*s times them; the phases are interleaved at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

GROUP_CHANNELS = 16


def output_size(size: int, stride: int) -> int:
    """Spatial output size `ceil(size / stride)` of the aggregation (and of its generator)."""
    return -(-size // stride)


def _accumulator(dtype):
    return jnp.promote_types(dtype, jnp.float32)  # bf16 accumulates in fp32; fp64 (oracles) stays fp64


def _tap_windows(a, *, k: int, s: int, d: int, out_size: tuple[int, int], axes: tuple[int, int] = (1, 2)):
    """The K*K strided windows of `a` zero-padded by `p` along `axes` (rows, columns) that the taps
    read, in tap order `kh*K + kw`; each has `out_size` along `axes`, like `x_tap` in the formula."""
    pad = d * (k - 1) // 2
    widths = [(0, 0)] * a.ndim
    for axis, size in zip(axes, out_size):
        # Pad the far side up to what the last strided tap reads, so every window has `size` rows.
        widths[axis] = (pad, max(0, s * (size - 1) + d * (k - 1) - pad - a.shape[axis] + 1))
    a_pad = jnp.pad(a, widths)
    windows = []
    for kh in range(k):
        for kw in range(k):
            index = [slice(None)] * a.ndim
            for axis, size, tap in zip(axes, out_size, (kh, kw)):
                index[axis] = slice(tap * d, tap * d + s * (size - 1) + 1, s)
            windows.append(a_pad[tuple(index)])
    return windows


def aggregate_autodiff(x, dynamic_kernel, static_kernel, *, kernel_size: int, stride: int, dilation: int):
    """`aggregate` with XLA's autodiff for gradients: the oracle its custom VJP is tested against.

    Same arguments and result as `aggregate`. Its backward transposes every strided slice to a
    zero-padded copy of `x`; correct, and any order of differentiation works, but ~150x the forward.
    """
    b, h, w, c = x.shape
    k, s, d = kernel_size, stride, dilation
    ho, wo = output_size(h, s), output_size(w, s)
    groups = c // GROUP_CHANNELS
    acc = _accumulator(x.dtype)
    # Per-tap pieces come from jnp.split, whose transpose is one concatenate: indexing tap k
    # instead would transpose to K*K zero-padded copies of the whole kernel in the backward pass.
    dynamic = jnp.split(dynamic_kernel.astype(acc), k * k, axis=-1)  # K*K x [B, Ho, Wo, G, 1]
    if static_kernel is not None:
        static = jnp.split(static_kernel.astype(acc).reshape(k * k, groups, GROUP_CHANNELS), k * k, axis=0)  # K*K x [1, G, 16]
    out = jnp.zeros((b, ho, wo, groups, GROUP_CHANNELS), acc)
    for t, tap in enumerate(_tap_windows(x, k=k, s=s, d=d, out_size=(ho, wo))):
        weight = dynamic[t]  # shared by a group's 16 channels
        if static_kernel is not None:
            weight = weight + static[t]
        out = out + weight * tap.astype(acc).reshape(b, ho, wo, groups, GROUP_CHANNELS)
    return out.reshape(b, ho, wo, c).astype(x.dtype)


def _phase_taps(k: int, s: int, d: int, phase: int) -> list[tuple[int, int]]:
    """`(kh, shift)` of the taps that reach input positions `r` with `(r + p) mod s == phase`.

    Such an `r` receives through tap `kh` from output index `m - shift`, with `m = (r + p) // s`
    and `shift = (kh*d - phase) / s`; taps with `kh*d` in another residue class never reach it.
    """
    return [(kh, (kh * d - phase) // s) for kh in range(k) if (kh * d) % s == phase]


def _input_grad(dout, dynamic, static, *, height: int, width: int, k: int, s: int, d: int, acc):
    """`dx: [B, H, W, C]` (in `acc`) from `dout: [B, Ho, Wo, C]` as a gather, phase by phase."""
    b, ho, wo, c = dout.shape
    groups = c // GROUP_CHANNELS
    pad = d * (k - 1) // 2
    # Input index r is s*m + phase - p; m runs over [m0, m1) so every r in [0, H) is covered.
    m0, m1 = pad // s, output_size(height + pad, s)
    n0, n1 = pad // s, output_size(width + pad, s)
    max_shift = (k - 1) * d // s
    # Output index m - shift must read zero outside [0, Ho): pad the output grid once, for all taps.
    pad_rows = (max_shift, max(0, m1 - ho))
    pad_cols = (max_shift, max(0, n1 - wo))
    spatial_pad = ((0, 0), pad_rows, pad_cols, (0, 0), (0, 0))
    dout_pad = jnp.pad(dout.astype(acc).reshape(b, ho, wo, groups, GROUP_CHANNELS), spatial_pad)
    dyn_pad = jnp.pad(dynamic.astype(acc), spatial_pad)
    if static is not None:
        static = static.astype(acc).reshape(k * k, groups, GROUP_CHANNELS)

    def window(a, row_shift, col_shift):
        rows = slice(max_shift - row_shift + m0, max_shift - row_shift + m1)
        cols = slice(max_shift - col_shift + n0, max_shift - col_shift + n1)
        return a[:, rows, cols]

    phases = []
    for row_phase in range(s):
        row = []
        for col_phase in range(s):
            total = jnp.zeros((b, m1 - m0, n1 - n0, groups, GROUP_CHANNELS), acc)
            for kh, row_shift in _phase_taps(k, s, d, row_phase):
                for kw, col_shift in _phase_taps(k, s, d, col_phase):
                    t = kh * k + kw
                    weight = window(dyn_pad[..., t : t + 1], row_shift, col_shift)
                    if static is not None:
                        weight = weight + static[t]
                    total = total + weight * window(dout_pad, row_shift, col_shift)
            row.append(total)
        phases.append(jnp.stack(row, axis=3))  # [B, M, N, s (col phase), G, 16]
    # Interleave: input row s*m + row_phase - p, column s*n + col_phase - p.
    dx_pad = jnp.stack(phases, axis=2).reshape(b, (m1 - m0) * s, (n1 - n0) * s, c)
    r0, q0 = pad - s * m0, pad - s * n0
    return dx_pad[:, r0 : r0 + height, q0 : q0 + width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _aggregate(x, dynamic_kernel, static_kernel, kernel_size, stride, dilation):
    return aggregate_autodiff(x, dynamic_kernel, static_kernel, kernel_size=kernel_size, stride=stride, dilation=dilation)


def _aggregate_fwd(x, dynamic_kernel, static_kernel, kernel_size, stride, dilation):
    out = aggregate_autodiff(x, dynamic_kernel, static_kernel, kernel_size=kernel_size, stride=stride, dilation=dilation)
    return out, (x, dynamic_kernel, static_kernel)


def _phase_split(a, *, k: int, s: int, d: int, out_size: tuple[int, int]):
    """`a: [B, H, W, ...]` zero-padded by `p` and split into its stride phases, `[B, s, s, Hs, Ws, ...]`.

    Tap `(kh, kw)` reads phase `((kh*d) % s, (kw*d) % s)` at rows `(kh*d) // s + [0, Ho)` and columns
    `(kw*d) // s + [0, Wo)`: a unit-stride window, where the strided window of `_tap_windows` costs
    XLA's CPU backend a copy per tap (space-to-depth once instead of K*K strided copies).
    """
    b, h, w = a.shape[:3]
    (ho, wo), pad, reach = out_size, d * (k - 1) // 2, d * (k - 1) // s
    # Each phase holds the rows the last tap reads and, at least, all of `a`.
    hp = max(s * (ho + reach), output_size(h + pad, s) * s)
    wp = max(s * (wo + reach), output_size(w + pad, s) * s)
    a = jnp.pad(a, [(0, 0), (pad, hp - pad - h), (pad, wp - pad - w)] + [(0, 0)] * (a.ndim - 3))
    return jnp.moveaxis(a.reshape(b, hp // s, s, wp // s, s, *a.shape[3:]), (2, 4), (1, 2))


def _dynamic_grad(x, dout, *, k: int, s: int, d: int):
    """`dHd: [B, Ho, Wo, G, K*K]`: per tap, `dout * x_tap` summed over each group's 16 channels.

    One image at a time (`lax.map`), in a channel-major layout `[16, H, W, G]` where the group sum
    adds 16 contiguous slabs: an image's `x` and `dout` stay in cache across its K*K tap loops,
    where whole-batch tap loops re-read both from memory per tap (~2x slower at K=7). XLA's CPU
    backend runs the alternatives far slower: minor-axis reductions, einsum, or a stack of the
    windows inside one loop (10-50x).
    """
    b, h, w, c = x.shape
    ho, wo = dout.shape[1:3]
    groups = c // GROUP_CHANNELS
    # [B, s, s, 16, Hs, Ws, G] and [B, 16, Ho, Wo, G], materialised behind a barrier: left alone,
    # layout assignment turns the transposes into strided views that every tap's loop reads across.
    x_cm = jnp.moveaxis(_phase_split(x.reshape(b, h, w, groups, GROUP_CHANNELS), k=k, s=s, d=d, out_size=(ho, wo)), -1, 3)
    dout_cm = dout.reshape(b, ho, wo, groups, GROUP_CHANNELS).transpose(0, 4, 1, 2, 3)
    x_cm, dout_cm = lax.optimization_barrier((x_cm, dout_cm))

    def image(args):
        x_i, dout_i = args  # [s, s, 16, Hs, Ws, G], [16, Ho, Wo, G]
        per_tap = []
        for kh in range(k):
            for kw in range(k):
                (oh, rh), (ow, rw) = divmod(kh * d, s), divmod(kw * d, s)  # (offset, phase)
                window = x_i[rh, rw, :, oh : oh + ho, ow : ow + wo]
                per_tap.append(functools.reduce(jnp.add, (dout_i[e] * window[e] for e in range(GROUP_CHANNELS))))
        return jnp.stack(per_tap, axis=-1)  # [Ho, Wo, G, K*K]

    return lax.map(image, (x_cm, dout_cm))


def _static_grad(x, dout, *, k: int, s: int, d: int):
    """`dS: [K*K, C]`: per tap, `dout * x_tap` summed over batch and space.

    One variadic `lax.reduce` makes all K*K sums in a single pass over the pixels, with the K*K
    products fused into it: K*K separate reductions each copy their window out first, and adding
    the images one by one per tap grew with the batch (at B=128, 14x14, C=16, K=7: 34 ms and a
    10 s compile, against 2 ms and 0.2 s). Space is summed per image and the images afterwards,
    which keeps float32 round-off near the per-tap sums' (one pass over all B*Ho*Wo terms
    lost ~10x more).
    """
    ho, wo = dout.shape[1:3]
    x_phases = _phase_split(x, k=k, s=s, d=d, out_size=(ho, wo))  # [B, s, s, Hs, Ws, C]
    products = []
    for kh in range(k):
        for kw in range(k):
            (oh, rh), (ow, rw) = divmod(kh * d, s), divmod(kw * d, s)
            products.append(dout * x_phases[:, rh, rw, oh : oh + ho, ow : ow + wo])
    zeros = (jnp.zeros((), dout.dtype),) * len(products)
    per_image = lax.reduce(tuple(products), zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (1, 2))  # K*K x [B, C]
    return jnp.stack(per_image).sum(axis=1)


def _aggregate_bwd(kernel_size, stride, dilation, residuals, dout):
    x, dynamic, static = residuals
    k, s, d = kernel_size, stride, dilation
    b, h, w, c = x.shape
    acc = _accumulator(x.dtype)
    x_acc, dout_acc = x.astype(acc), dout.astype(acc)
    ddyn = _dynamic_grad(x_acc, dout_acc, k=k, s=s, d=d)
    # Barriers keep the three gradients' loops apart: XLA's CPU backend otherwise merges loops
    # that share inputs into multi-output fusions that run slower than the parts.
    x_acc, dout_acc, ddyn = lax.optimization_barrier((x_acc, dout_acc, ddyn))
    dstatic = None
    if static is not None:
        dstatic = _static_grad(x_acc, dout_acc, k=k, s=s, d=d).astype(static.dtype)
        dout_acc, dstatic = lax.optimization_barrier((dout_acc, dstatic))
    dx = _input_grad(dout_acc, dynamic, static, height=h, width=w, k=k, s=s, d=d, acc=acc)
    return dx.astype(x.dtype), ddyn.astype(dynamic.dtype), dstatic


_aggregate.defvjp(_aggregate_fwd, _aggregate_bwd)


def aggregate(x, dynamic_kernel, static_kernel, *, kernel_size: int, stride: int, dilation: int):
    """Aggregates `x` with a per-pixel, per-group kernel plus an optional per-channel one.

    Reverse-mode gradients (`jax.grad`, `jax.vjp`) come from the custom VJP of the module
    docstring, equal to `aggregate_autodiff`'s to float32 round-off. Second-order use is out of
    scope: forward mode (`jax.jvp`, `jax.jacfwd`) raises, as for every `jax.custom_vjp`, and
    differentiating the gradient again is untested; use `aggregate_autodiff` for those.

    Args:
      x: `[B, H, W, C]`, C a multiple of 16.
      dynamic_kernel: `[B, Ho, Wo, G, K*K]` with `G = C // 16`, tap index `kh*K + kw`.
      static_kernel: `[K*K, C]` or None.
      kernel_size, stride, dilation: K, s, d (K odd).

    Returns:
      `[B, Ho, Wo, C]` in the dtype of `x`; products are accumulated in (at least) float32, in
      the backward too. Gradients take the dtype of their input.
    """
    return _aggregate(x, dynamic_kernel, static_kernel, kernel_size, stride, dilation)


def dynamic_kernel(features, span_kernel, span_bias, *, kernel_size: int):
    """The generator's span conv `Hd = v @ W2 + b` as `[B, Ho, Wo, G, K*K]`, accumulated in float32.

    Args:
      features: `v`, `[B, Ho, Wo, R]`.
      span_kernel: `W2`, `[R, G*K*K]` (or flax's `[1, 1, R, G*K*K]`), column `g*K*K + kh*K + kw`.
      span_bias: `b`, `[G*K*K]`.
      kernel_size: K.

    Returns:
      `[B, Ho, Wo, G, K*K]` in float32 (float64 for float64 inputs), never rounded to a bf16
      input's dtype, as the fused kernels keep it.
    """
    acc = _accumulator(features.dtype)
    w2 = span_kernel.reshape(-1, span_kernel.shape[-1])
    span = jnp.matmul(features, w2, preferred_element_type=acc) + span_bias.astype(acc)
    return span.reshape(*features.shape[:3], -1, kernel_size**2)


def fused_aggregate(x, features, span_kernel, span_bias, static_kernel, *, kernel_size: int, stride: int, dilation: int):
    """`kernels.fused.fused_aggregate` in jnp: `aggregate(x, dynamic_kernel(v, W2, b), S)`.

    Here `Hd` is materialised (XLA may fuse it away); the matmul runs at the default precision,
    as the unfused layer's span conv does (wrap in `jax.default_matmul_precision("highest")` for
    a float32 oracle on GPU/TPU).

    Args:
      x: `[B, H, W, C]`, C a multiple of 16.
      features: `v`, `[B, Ho, Wo, R]`.
      span_kernel: `W2`, `[R, G*K*K]` or `[1, 1, R, G*K*K]`.
      span_bias: `b`, `[G*K*K]`.
      static_kernel: `[K*K, C]` or None.
      kernel_size, stride, dilation: K (odd), s, d.

    Returns:
      `[B, Ho, Wo, C]` in the dtype of `x`.
    """
    hd = dynamic_kernel(features, span_kernel, span_bias, kernel_size=kernel_size)
    return aggregate(x, hd, static_kernel, kernel_size=kernel_size, stride=stride, dilation=dilation)


# How close a kernel's result must be to this reference, computed in float32 on the same input
# values: float32 within 1e-5 relative, element by element (plus 1e-5 of the result's largest
# magnitude, for values near zero); bfloat16 within 1e-2 of that largest magnitude, as single
# bf16 values near zero have no relative precision. The tests and `kernels.gpu_check` both hold
# the kernels to it.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def compare(got, expected, dtype) -> tuple[float, bool]:
    """`(max |got - expected| / max |expected|, within TOLERANCE[dtype])` of a kernel's result.

    Computed in float32 where the arrays are (a device's result is not copied to the host), as one
    jitted program per shape.
    """
    dtype = jnp.dtype(dtype).name
    if dtype not in TOLERANCE:
        raise ValueError(f"compare: dtype {dtype}; the kernels' tolerances are for {sorted(TOLERANCE)}.")
    if jnp.shape(got) != jnp.shape(expected):
        raise ValueError(f"compare: shapes differ, got {jnp.shape(got)}, expected {jnp.shape(expected)}.")
    if not jnp.size(expected):
        return 0.0, True
    relative, ok = _compare(got, expected, dtype)
    return float(relative), bool(ok)


@functools.partial(jax.jit, static_argnums=2)
def _compare(got, expected, dtype: str):
    got, expected = got.astype(jnp.float32), expected.astype(jnp.float32)
    tol, scale, error = TOLERANCE[dtype], jnp.abs(expected).max(), jnp.abs(got - expected)
    if dtype == "float32":
        ok = jnp.all(error <= tol * scale + tol * jnp.abs(expected))
    else:
        ok = error.max() <= tol * scale
    relative = error.max() / jnp.where(scale > 0, scale, 1.0)
    return relative, ok & jnp.isfinite(relative)
