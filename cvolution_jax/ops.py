"""The C-volution aggregation: one public function that checks its input and dispatches.

`aggregate` is the operator of `docs/cvolution.md` ("Aggregation"); the layers in
`cvolution_jax.layers` generate its kernels. Implementations live in `kernels/`:

- `"xla"`: the plain-jnp reference (`kernels.reference`), on every backend.
- `"pallas"`: the Pallas kernels lowered through Triton (`kernels.pallas`), forward and a custom
  VJP (`dx` as a gather, `dHd`, `dS` from per-block partial sums), float32 or bfloat16. On a GPU
  they are compiled; on any other backend they run in Pallas's interpreter (correct but slow,
  for tests), and the first such call says so in the log.
- `"auto"`: the Pallas kernels when `jax.default_backend() == "gpu"` and the inputs suit them
  (float32/bfloat16, fewer than 2**31 elements per array), the XLA reference otherwise.
"""

from __future__ import annotations

import logging

import jax

from kernels import pallas, reference

GROUP_CHANNELS = reference.GROUP_CHANNELS
IMPLS = ("auto", "xla", "pallas")

logger = logging.getLogger(__name__)
_interpret_logged = False


def _log_interpret_once(backend: str) -> None:
    global _interpret_logged
    if not _interpret_logged:
        _interpret_logged = True
        logger.warning(
            "aggregate(impl='pallas') on backend %r: no GPU, so the Pallas kernels run in interpret "
            "mode (correct, much slower). Use impl='auto' or 'xla' off GPU.", backend,
        )


def _check_positive_int(name: str, value, *, odd: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (odd and value % 2 == 0):
        kind = "an odd integer >= 1 (padding d*(K-1)/2 must be whole)" if odd else "an integer >= 1"
        raise ValueError(f"aggregate: {name} must be {kind}; got {value!r}.")


def _check_shape(name: str, shape, expected, meaning: str) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"aggregate: {name} has shape {tuple(shape)}; expected {tuple(expected)} ({meaning}). "
            f"Build it for the same x, kernel_size and stride."
        )


def aggregate(x, dynamic_kernel, static_kernel=None, *, kernel_size: int, stride: int = 1, dilation: int = 1, impl: str = "auto"):
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

    Returns:
      `[B, Ho, Wo, C]` in the dtype of `x`, accumulated in float32.

    Raises:
      ValueError: naming the argument, what it was and what was expected; for `impl="pallas"`
        also when the kernels do not take the inputs (a dtype other than float32/bfloat16,
        an array of 2**31 elements or more).
    """
    if impl not in IMPLS:
        raise ValueError(f"aggregate: impl must be one of {IMPLS}; got {impl!r}.")
    _check_positive_int("kernel_size", kernel_size, odd=True)
    _check_positive_int("stride", stride)
    _check_positive_int("dilation", dilation)
    if x.ndim != 4:
        raise ValueError(f"aggregate: x must be [B, H, W, C] (rank 4, NHWC); got rank {x.ndim}, shape {tuple(x.shape)}.")
    b, h, w, c = x.shape
    if c % GROUP_CHANNELS:
        raise ValueError(
            f"aggregate: x has C={c} channels; expected a multiple of {GROUP_CHANNELS} "
            f"(each group of {GROUP_CHANNELS} channels shares one dynamic kernel). Pad or widen the layer."
        )
    ho, wo = reference.output_size(h, stride), reference.output_size(w, stride)
    if dynamic_kernel.ndim != 5:
        raise ValueError(
            f"aggregate: dynamic_kernel must be [B, Ho, Wo, G, K*K] (rank 5); got rank {dynamic_kernel.ndim}, "
            f"shape {tuple(dynamic_kernel.shape)}."
        )
    _check_shape(
        "dynamic_kernel", dynamic_kernel.shape, (b, ho, wo, c // GROUP_CHANNELS, kernel_size**2),
        f"[B, ceil(H/{stride}), ceil(W/{stride}), C/{GROUP_CHANNELS}, K*K] for x {tuple(x.shape)}, K={kernel_size}",
    )
    if static_kernel is not None:
        _check_shape("static_kernel", static_kernel.shape, (kernel_size**2, c), f"[K*K, C] for K={kernel_size}, C={c}")
    config = dict(kernel_size=kernel_size, stride=stride, dilation=dilation)
    backend = jax.default_backend()
    if impl == "auto":
        on_gpu = backend == "gpu" and pallas.unsupported_reason(x, dynamic_kernel, static_kernel) is None
        impl = "pallas" if on_gpu else "xla"
    if impl == "xla":
        return reference.aggregate(x, dynamic_kernel, static_kernel, **config)
    reason = pallas.unsupported_reason(x, dynamic_kernel, static_kernel)
    if reason:
        raise ValueError(f"aggregate: impl='pallas' cannot take these inputs: {reason}. Use impl='xla' or 'auto'.")
    if backend != "gpu":
        _log_interpret_once(backend)
    return pallas.aggregate(x, dynamic_kernel, static_kernel, **config, interpret=backend != "gpu")
