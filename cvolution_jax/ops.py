"""The C-volution aggregation: public functions that check their input and dispatch.

`aggregate` is the operator of `docs/cvolution.md` ("Aggregation"); the layers in
`cvolution_jax.layers` generate its kernels. `fused_aggregate` is the same operator with the
generator's last 1x1 conv (`Hd = v @ W2 + b`) folded in, for layers built with
`fuse_generator=True`. Implementations live in `kernels/`, and `impl` chooses for both:

- `"xla"`: the plain-jnp reference (`kernels.reference`), on every backend, with a custom VJP
  written as sums of shifted slices like its forward (`reference.aggregate_autodiff` is the
  plain-autodiff oracle); the fused reference materialises `Hd` and calls it.
- `"pallas"`: the Pallas kernels lowered through Triton (`kernels.pallas`; fused: `kernels.fused`),
  forward and a custom VJP (`dx` as a gather, `dHd`, `dS` from per-block partial sums), float32 or bfloat16. On a GPU
  they are compiled; on any other backend they run in Pallas's interpreter (correct but slow,
  for tests), and the first such call says so in the log.
- `"auto"`: the Pallas kernels when `jax.default_backend() == "gpu"` and the inputs suit them
  (float32/bfloat16, fewer than 2**31 elements per array), the XLA reference otherwise.

`tiles` sets the Pallas kernels' work split by hand (`kernels.pallas.AggregateTiles`,
`kernels.fused.FusedTiles`, as jax's attention kernels take `BlockSizes`); None keeps the
heuristics. The XLA reference has no tiles: `impl="xla"` refuses them and `"auto"` ignores them
where it picks the reference.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from kernels import fused, pallas, reference

GROUP_CHANNELS = reference.GROUP_CHANNELS
IMPLS = ("auto", "xla", "pallas")

logger = logging.getLogger(__name__)
_interpret_logged = False


def _log_interpret_once(fn: str, backend: str) -> None:
    global _interpret_logged
    if not _interpret_logged:
        _interpret_logged = True
        logger.warning(
            "%s(impl='pallas') on backend %r: no GPU, so the Pallas kernels run in interpret "
            "mode (correct, much slower). Use impl='auto' or 'xla' off GPU.", fn, backend,
        )


def _check_positive_int(fn: str, name: str, value, *, odd: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (odd and value % 2 == 0):
        kind = "an odd integer >= 1 (padding d*(K-1)/2 must be whole)" if odd else "an integer >= 1"
        raise ValueError(f"{fn}: {name} must be {kind}; got {value!r}.")


# What the implementations compute: float32 and bfloat16 (accumulated in float32); float64 on the
# XLA path where jax's x64 mode is on (gradient checks, oracles). float16 has no fp32-accumulating
# path here and integers, bool and complex have no gradient meaning.
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float64))


def _check_array(fn: str, name: str, value) -> None:
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise ValueError(
            f"{fn}: {name} is a {type(value).__name__}; expected a jax or numpy array. Convert it with jnp.asarray first."
        )
    dtype = jnp.dtype(value.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{fn}: {name} has dtype {dtype}; expected float32 or bfloat16 (float64 on impl='xla'). "
            f"Cast it, e.g. {name}.astype(jnp.float32)."
        )


def _check_shape(fn: str, name: str, shape, expected, meaning: str) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"{fn}: {name} has shape {tuple(shape)}; expected {tuple(expected)} ({meaning}). "
            f"Build it for the same x, kernel_size and stride."
        )


def _check_common(fn: str, arrays: dict, *, kernel_size, stride, dilation, impl) -> tuple[int, int]:
    """Checks what both entry points share; returns `(Ho, Wo)`."""
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {IMPLS}; got {impl!r}.")
    for name, value in arrays.items():
        if value is not None:
            _check_array(fn, name, value)
    _check_positive_int(fn, "kernel_size", kernel_size, odd=True)
    _check_positive_int(fn, "stride", stride)
    _check_positive_int(fn, "dilation", dilation)
    x = arrays["x"]
    if x.ndim != 4:
        raise ValueError(f"{fn}: x must be [B, H, W, C] (rank 4, NHWC); got rank {x.ndim}, shape {tuple(x.shape)}.")
    c = x.shape[-1]
    if c % GROUP_CHANNELS:
        raise ValueError(
            f"{fn}: x has C={c} channels; expected a multiple of {GROUP_CHANNELS} "
            f"(each group of {GROUP_CHANNELS} channels shares one dynamic kernel). Pad or widen the layer."
        )
    static_kernel = arrays.get("static_kernel")
    if static_kernel is not None:
        _check_shape(fn, "static_kernel", static_kernel.shape, (kernel_size**2, c), f"[K*K, C] for K={kernel_size}, C={c}")
    return reference.output_size(x.shape[1], stride), reference.output_size(x.shape[2], stride)


def _resolve_impl(fn: str, impl: str, reason: str | None, tiles, tiles_type) -> tuple[str, bool]:
    """`("xla" | "pallas", interpret)` for `impl`, given why the Pallas kernels cannot run (or None)."""
    if tiles is not None and not isinstance(tiles, tiles_type):
        raise ValueError(
            f"{fn}: tiles is a {type(tiles).__name__}; expected {tiles_type.__module__}.{tiles_type.__name__} or None (the heuristics)."
        )
    if tiles is not None and impl == "xla":
        raise ValueError(f"{fn}: tiles set the Pallas kernels' tiles, and impl='xla' runs none. Drop tiles, or use impl='pallas' or 'auto'.")
    backend = jax.default_backend()
    if impl == "auto":
        impl = "pallas" if backend == "gpu" and reason is None else "xla"
    if impl == "xla":
        return impl, False
    if reason:
        raise ValueError(f"{fn}: impl='pallas' cannot take these inputs: {reason}. Use impl='xla' or 'auto'.")
    if backend != "gpu":
        _log_interpret_once(fn, backend)
    return impl, backend != "gpu"


def aggregate(
    x, dynamic_kernel, static_kernel=None, *, kernel_size: int, stride: int = 1, dilation: int = 1, impl: str = "auto",
    tiles: pallas.AggregateTiles | None = None,
):
    """Aggregates `x` with a dynamic per-pixel kernel and an optional static per-channel kernel.

        out[b, i, j, c] = sum_{kh, kw} (Hd[b, i, j, c // 16, kh*K + kw] + S[kh*K + kw, c])
                                       * x_pad[b, s*i + kh*d, s*j + kw*d, c]

    `x_pad` is `x` zero-padded by `d*(K-1)/2` on each spatial side; `Ho, Wo = ceil(H/s), ceil(W/s)`.

    Args:
      x: `[B, H, W, C]` with C a multiple of 16 (16 channels share one dynamic kernel).
      dynamic_kernel: `[B, Ho, Wo, G, K*K]`, `G = C // 16`, tap index `kh*K + kw`.
      static_kernel: `[K*K, C]` (C-volution's channel branch) or None (involution).
      kernel_size: K, odd.
      stride: s >= 1.
      dilation: d >= 1.
      impl: `"auto"` (Pallas on GPU, XLA elsewhere), `"xla"` (the jnp reference, any backend) or
        `"pallas"` (the Triton kernels; interpret mode, logged once, off GPU).
      tiles: `kernels.pallas.AggregateTiles` for the Pallas kernels (a None field keeps its
        heuristic); None keeps them all.

    Returns:
      `[B, Ho, Wo, C]` in the dtype of `x`, accumulated in float32 (float64 for float64 inputs).
      Reverse-mode gradients come from each implementation's custom VJP; forward mode
      (`jax.jvp`) and second-order use are out of scope.

    Raises:
      ValueError: naming the argument, what it was and what was expected: a list or other
        non-array, a dtype other than float32/bfloat16/float64 (integers, bool, complex,
        float16), a shape that does not fit; for `impl="pallas"` also when the kernels do not
        take the inputs (float64, an array of 2**31 elements or more); for tiles that are not
        `AggregateTiles`, that the kernels cannot run, or given with `impl="xla"`.
    """
    ho, wo = _check_common(
        "aggregate", dict(x=x, dynamic_kernel=dynamic_kernel, static_kernel=static_kernel),
        kernel_size=kernel_size, stride=stride, dilation=dilation, impl=impl,
    )
    b, _, _, c = x.shape
    if dynamic_kernel.ndim != 5:
        raise ValueError(
            f"aggregate: dynamic_kernel must be [B, Ho, Wo, G, K*K] (rank 5); got rank {dynamic_kernel.ndim}, "
            f"shape {tuple(dynamic_kernel.shape)}."
        )
    _check_shape(
        "aggregate", "dynamic_kernel", dynamic_kernel.shape, (b, ho, wo, c // GROUP_CHANNELS, kernel_size**2),
        f"[B, ceil(H/{stride}), ceil(W/{stride}), C/{GROUP_CHANNELS}, K*K] for x {tuple(x.shape)}, K={kernel_size}",
    )
    config = dict(kernel_size=kernel_size, stride=stride, dilation=dilation)
    reason = pallas.unsupported_reason(x, dynamic_kernel, static_kernel)
    impl, interpret = _resolve_impl("aggregate", impl, reason, tiles, pallas.AggregateTiles)
    if impl == "xla":
        return reference.aggregate(x, dynamic_kernel, static_kernel, **config)
    return pallas.aggregate(x, dynamic_kernel, static_kernel, **config, tiles=tiles, interpret=interpret)


def fused_aggregate(
    x, features, span_kernel, span_bias, static_kernel=None, *, kernel_size: int, stride: int = 1, dilation: int = 1,
    impl: str = "auto", tiles: fused.FusedTiles | None = None,
):
    """`aggregate(x, Hd, static_kernel)` with `Hd = features @ span_kernel + span_bias` folded in.

    The generator's last 1x1 conv (its "span conv") and the aggregation as one operator, for
    layers built with `fuse_generator=True`. `impl="pallas"` runs `kernels.fused`, which
    recomputes `Hd` per tile and never stores it; `impl="xla"` runs `reference.fused_aggregate`,
    which materialises `Hd` (in float32) and aggregates it with the XLA reference.

    Args:
      x: `[B, H, W, C]`, C a multiple of 16.
      features: `v`, `[B, Ho, Wo, R]` (R = C/4 in the layers).
      span_kernel: `W2`, `[R, G*K*K]` or flax's `[1, 1, R, G*K*K]`; column `g*K*K + kh*K + kw`.
      span_bias: `b`, `[G*K*K]`.
      static_kernel: `[K*K, C]` or None.
      kernel_size, stride, dilation, impl: as for `aggregate`.
      tiles: `kernels.fused.FusedTiles` for the fused kernels, as `tiles` of `aggregate`.

    Returns:
      `[B, Ho, Wo, C]` in the dtype of `x`; `Hd` is accumulated in float32 and never rounded to a
      bfloat16 input's dtype, on either implementation.

    Raises:
      ValueError: as `aggregate`, and when `features`, `span_kernel` and `span_bias` do not fit
        `x`, `kernel_size` and `stride`.
    """
    arrays = dict(x=x, features=features, span_kernel=span_kernel, span_bias=span_bias, static_kernel=static_kernel)
    ho, wo = _check_common("fused_aggregate", arrays, kernel_size=kernel_size, stride=stride, dilation=dilation, impl=impl)
    b, _, _, c = x.shape
    if features.ndim != 4 or tuple(features.shape[:3]) != (b, ho, wo):
        raise ValueError(
            f"fused_aggregate: features has shape {tuple(features.shape)}; expected [B, Ho, Wo, R] = [{b}, {ho}, {wo}, R] "
            f"for x {tuple(x.shape)}, stride {stride}. Compute it from the same x."
        )
    span_width = c // GROUP_CHANNELS * kernel_size**2
    reduced = features.shape[-1]
    if np.prod(span_kernel.shape[:-1]) != reduced or span_kernel.shape[-1] != span_width or tuple(span_bias.shape) != (span_width,):
        raise ValueError(
            f"fused_aggregate: span_kernel {tuple(span_kernel.shape)} and span_bias {tuple(span_bias.shape)} must be "
            f"[R, G*K*K] = [{reduced}, {span_width}] and [{span_width}] (G = C/16 = {c // GROUP_CHANNELS}, K = {kernel_size}). "
            f"Pass the generator's span_conv kernel and bias for this layer."
        )
    config = dict(kernel_size=kernel_size, stride=stride, dilation=dilation)
    reason = fused.unsupported_reason(x, features, span_kernel, span_bias, static_kernel)
    impl, interpret = _resolve_impl("fused_aggregate", impl, reason, tiles, fused.FusedTiles)
    if impl == "xla":
        return reference.fused_aggregate(x, features, span_kernel, span_bias, static_kernel, **config)
    return fused.fused_aggregate(x, features, span_kernel, span_bias, static_kernel, **config, tiles=tiles, interpret=interpret)
