"""Pallas (Triton) kernels of the C-volution aggregation and its three gradients.

    out[b, i, j, c] = sum_{kh, kw} (Hd[b, i, j, c // 16, kh*K + kw] + S[kh*K + kw, c])
                                   * x_pad[b, s*i + kh*d, s*j + kw*d, c]

`aggregate` here has the signature of `kernels.reference.aggregate` (plus `tiles` and `interpret`) and is
wired with `jax.custom_vjp`, so `jax.grad` runs three more kernels instead of autodiff:

- forward: one program writes a `[TW, TC]` tile (TW output columns, TC channels) of one output
  row; it loops over the K*K taps, reading `x` with masked loads (zero outside the image, so
  `x` is never padded in memory) and the group-shared `Hd` gathered by `c // 16`.
- `dx`: a gather, not a scatter. Input row `r` receives from output row `i` through tap `kh`
  iff `r + p - kh*d = s*i` with `0 <= i < Ho` (columns alike), so one program owns a tile of
  `dx` and sums the output positions that touch it: no atomics, a fixed summation order.
- `dHd` and `dS` share the products `dout * x_tap` and come from one kernel: `dHd` sums them
  over the 16 channels of a group, `dS` over the rows and columns of a block of output rows.
  Each block writes its own `[K*K, C]` partial sum; `jnp.sum` over blocks finishes `dS`
  (deterministic, no atomics).

All arrays travel as flat refs indexed with int32 offset tensors, every tensor inside a kernel
has power-of-two dimensions and ragged borders are masked (`kernels.common`). Inputs may
be float32 or bfloat16; products accumulate in float32 and each result takes the dtype of the
input it belongs to (`out` and `dx` of `x`, `dHd` of `Hd`, `dS` of `S`).

`interpret=True` runs the same kernels through Pallas's interpreter on any backend (CPU tests).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import common
from kernels.common import GROUP_CHANNELS, Geometry, Tiles, load, store

class AggregateTiles(NamedTuple):
    """Tiles of the three kernels, as jax's attention kernels take `BlockSizes`.

    A field left None takes the heuristic (`default_tiles`); tests pass small tiles to make
    every program meet a border, and tuning passes others without editing the heuristics.
    """

    forward: Tiles | None = None
    dx: Tiles | None = None
    weight_grads: Tiles | None = None


def elementwise_tiles(width: int, channels: int, *, gather: bool = False) -> Tiles:
    """Tiles of the forward and `dx` kernels, one program per `[TW, TC]` tile of one row.

    Channels are the contiguous axis of NHWC, so a program takes as many of them as it can
    (all of them up to 256, rounded up to a power of two): then a tile of one row is one
    contiguous stretch of memory and every tap's load is coalesced. The columns fill the tile up
    to 2048 elements (16 fp32 accumulators per thread at 4 warps), capped at the row width
    rounded up to a power of two so narrow late-stage rows (7, 14) waste at most the rounding.

    For RedNet-50 at 224: stem C=32 W=112 -> 64x32; C=64 W=56 -> 32x64; C=128 W=28 -> 16x128;
    C=256 W=14 -> 8x256; C=512 W=7 -> 8x256 (two channel tiles). No `tl.dot` in these loops,
    so Triton's software pipeliner has nothing to stage: `num_stages=1` (tune on a GPU).

    `gather=True` (the `dx` kernel) takes at most 128 channels and 1024 elements, 4 per thread:
    per tap it also works out which output pixel feeds each column (a division by the stride),
    and ptxas keeps the K unrolled taps' loads in flight, so at 16 elements per thread the
    stride-2 layers needed 128-186 registers and bf16 C=128 spilled, and at 8 the newer jax's
    ptxas still gave fp32 C=256 stride 2 149 registers (sm_90, `python -m kernels.compile`).

    Args:
      width: columns of the array the kernel writes (Wo for the forward, W for `dx`).
      channels: C.
      gather: tiles for the `dx` gather kernel.
    """
    tc = min(pl.next_power_of_2(channels), 128 if gather else 256)
    tw = min(pl.next_power_of_2(width), max(1, (1024 if gather else 2048) // tc))
    return Tiles(tw, tc, 1, common.warps(tw * tc, 4 if gather else 16), 1)


def weight_grad_tiles(rows: int, width: int, channels: int, *, with_static: bool) -> Tiles:
    """Tiles of the `dHd`/`dS` kernel: a `[TW, TC]` tile over a block of consecutive output rows.

    Output rows are flattened over batch and height (`b*Ho + i`), so a block may span images.
    Without a static kernel every program takes one row (most parallelism, nothing to reduce).
    With one, each program writes a `[K*K, TC]` partial sum of `dS`, so blocks hold several rows:
    just enough blocks for about `common.WEIGHT_GRAD_PROGRAMS` programs, which bounds the partial-sum
    buffer at `WEIGHT_GRAD_PROGRAMS * K*K * TC` floats (6.4 MB for K=7, TC=64). TC is capped at
    64 (not 256 as in the forward) because the buffer grows with it; TW covers the row up to
    2048 elements per tile as in the forward (a 64x64 tile at 8 warps spilled in bf16 on sm_90).

    Args:
      rows: B * Ho.
      width: Wo.
      channels: C.
      with_static: whether `dS` is computed.
    """
    tc = min(pl.next_power_of_2(channels), 64)
    tw = min(pl.next_power_of_2(width), 2048 // tc)
    rows_per_block = 1
    if with_static:
        tiles_per_row = pl.cdiv(width, tw) * pl.cdiv(channels, tc)
        blocks = min(rows, max(1, pl.cdiv(common.WEIGHT_GRAD_PROGRAMS, tiles_per_row)))
        rows_per_block = pl.cdiv(rows, blocks)
    return Tiles(tw, tc, rows_per_block, common.warps(tw * tc), 1)


def default_tiles(geo: Geometry, with_static: bool) -> AggregateTiles:
    """The heuristic tiles of every kernel for this aggregation."""
    return AggregateTiles(
        forward=elementwise_tiles(geo.out_width, geo.channels),
        dx=elementwise_tiles(geo.width, geo.channels, gather=True),
        weight_grads=weight_grad_tiles(geo.batch * geo.out_height, geo.out_width, geo.channels, with_static=with_static),
    )


def _forward_kernel(*refs, geo: Geometry, tiles: Tiles, with_static: bool):
    x_ref, dyn_ref, static_ref, out_ref = common.split_refs(refs, 2, with_static)
    (k, s, d, p), (h, w, c, ho, wo) = geo.window, geo.sizes
    n, b, i = common.program_row(ho)  # output row n = b*Ho + i
    j, ch, out_ok = common.tile_ids(tiles, wo, c)
    dyn_base = ((n * wo + j) * geo.groups + ch // GROUP_CHANNELS) * geo.taps  # [TW, TC]

    def tap_row(kh, acc):
        r = s * i + kh * d - p
        row_ok = (r >= 0) & (r < h)
        row_base = (b * h + r) * w
        for kw in range(k):  # unrolled: K independent loads in flight per iteration
            q = s * j + kw * d - p
            # Taps outside the image read nothing (x_pad is zero there), Hd included.
            ok = out_ok & row_ok & (q >= 0) & (q < w)
            weight = load(dyn_ref, dyn_base + (kh * k + kw), ok)
            if with_static:
                weight = weight + load(static_ref, (kh * k + kw) * c + ch, ch < c)
            acc = acc + weight * load(x_ref, (row_base + q) * c + ch, ok)
        return acc

    acc = lax.fori_loop(0, k, tap_row, jnp.zeros((tiles.width, tiles.channels), jnp.float32))
    store(out_ref, (n * wo + j) * c + ch, acc, out_ok, geo.interpret)


def _dx_kernel(*refs, geo: Geometry, tiles: Tiles, with_static: bool):
    dout_ref, dyn_ref, static_ref, dx_ref = common.split_refs(refs, 2, with_static)
    (k, s, d, p), (h, w, c, ho, wo) = geo.window, geo.sizes
    m, b, r = common.program_row(h)  # input row m = b*H + r
    q, ch, in_ok = common.tile_ids(tiles, w, c)
    group = ch // GROUP_CHANNELS

    def tap_row(kh, acc):
        # r = s*i + kh*d - p: the output row that reads input row r through tap row kh.
        i, row_ok = common.source_index(r, kh * d - p, s, ho)
        n = b * ho + i
        for kw in range(k):
            j, col_ok = common.source_index(q, kw * d - p, s, wo)
            ok = in_ok & row_ok & col_ok
            weight = load(dyn_ref, ((n * wo + j) * geo.groups + group) * geo.taps + (kh * k + kw), ok)
            if with_static:
                weight = weight + load(static_ref, (kh * k + kw) * c + ch, ch < c)
            acc = acc + weight * load(dout_ref, (n * wo + j) * c + ch, ok)
        return acc

    acc = lax.fori_loop(0, k, tap_row, jnp.zeros((tiles.width, tiles.channels), jnp.float32))
    store(dx_ref, (m * w + q) * c + ch, acc, in_ok, geo.interpret)


def _weight_grad_kernel(*refs, geo: Geometry, tiles: Tiles, with_static: bool):
    x_ref, dout_ref, ddyn_ref, *rest = refs
    dstatic_ref = rest[0] if with_static else None
    k, c, ho, wo = geo.kernel_size, geo.channels, geo.out_height, geo.out_width
    rows = geo.batch * ho
    block = pl.program_id(0)
    j, ch, col_ok = common.tile_ids(tiles, wo, c)
    tile_groups = tiles.channels // GROUP_CHANNELS
    g = pl.program_id(2) * tile_groups + jnp.arange(tile_groups)[None, :]  # [1, TG]
    # Program ids are read out here: the interpreter does not substitute them inside loops.
    part = block * pl.cdiv(wo, tiles.width) + pl.program_id(1)  # this program's dS partial sum
    chans = pl.program_id(2) * tiles.channels + jnp.arange(tiles.channels)  # [TC]

    def tap(t, carry):
        kh, kw = lax.div(t, k), lax.rem(t, k)

        def row(step, acc):
            n = block * tiles.rows + step  # output row b*Ho + i
            n_ok = n < rows
            prod = common.tap_products(x_ref, dout_ref, geo, n, j, ch, kh, kw, col_ok & n_ok)
            # dHd: the 16 channels of a group are 16 adjacent lanes of the tile.
            group_sum = prod.reshape(tiles.width, tile_groups, GROUP_CHANNELS).sum(axis=-1)
            ddyn_ok = n_ok & (j < wo) & (g < geo.groups)
            store(ddyn_ref, ((n * wo + j) * geo.groups + g) * geo.taps + t, group_sum, ddyn_ok, geo.interpret)
            return acc + prod

        acc = lax.fori_loop(0, tiles.rows, row, jnp.zeros((tiles.width, tiles.channels), jnp.float32))
        if with_static:
            store(dstatic_ref, (part * geo.taps + t) * c + chans, acc.sum(axis=0), chans < c, geo.interpret)
        return carry

    lax.fori_loop(0, geo.taps, tap, 0)


def _forward(geo: Geometry, tiles: Tiles, x, dynamic, static):
    kernel = functools.partial(_forward_kernel, geo=geo, tiles=tiles, with_static=static is not None)
    grid = (geo.batch * geo.out_height, pl.cdiv(geo.out_width, tiles.width), pl.cdiv(geo.channels, tiles.channels))
    out_shape = jax.ShapeDtypeStruct((geo.batch * geo.out_height * geo.out_width * geo.channels,), x.dtype)
    out = geo.call(kernel, tiles, grid, out_shape, "cvolution_forward", x, dynamic, static)
    return out.reshape(geo.batch, geo.out_height, geo.out_width, geo.channels)


def _dx(geo: Geometry, tiles: Tiles, dout, dynamic, static, dtype):
    kernel = functools.partial(_dx_kernel, geo=geo, tiles=tiles, with_static=static is not None)
    grid = (geo.batch * geo.height, pl.cdiv(geo.width, tiles.width), pl.cdiv(geo.channels, tiles.channels))
    out_shape = jax.ShapeDtypeStruct((geo.batch * geo.height * geo.width * geo.channels,), dtype)
    dx = geo.call(kernel, tiles, grid, out_shape, "cvolution_dx", dout, dynamic, static)
    return dx.reshape(geo.batch, geo.height, geo.width, geo.channels)


def _weight_grads(geo: Geometry, tiles: Tiles, x, dout, dynamic, static):
    with_static = static is not None
    rows = geo.batch * geo.out_height
    grid = (pl.cdiv(rows, tiles.rows), pl.cdiv(geo.out_width, tiles.width), pl.cdiv(geo.channels, tiles.channels))
    out_shape = [jax.ShapeDtypeStruct((dynamic.size,), dynamic.dtype)]
    if with_static:
        partials = grid[0] * grid[1]  # one [K*K, C] partial sum per (row block, column tile)
        out_shape.append(jax.ShapeDtypeStruct((partials * geo.taps * geo.channels,), jnp.float32))
    kernel = functools.partial(_weight_grad_kernel, geo=geo, tiles=tiles, with_static=with_static)
    grads = geo.call(kernel, tiles, grid, out_shape, "cvolution_weight_grads", x, dout)
    ddyn = grads[0].reshape(dynamic.shape)
    if not with_static:
        return ddyn, None
    dstatic = grads[1].reshape(-1, geo.taps, geo.channels).sum(axis=0)  # fixed order: deterministic
    return ddyn, dstatic.astype(static.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _aggregate(geo: Geometry, tiles: AggregateTiles, x, dynamic, static):
    return _forward(geo, tiles.forward, x, dynamic, static)


def _aggregate_fwd(geo: Geometry, tiles: AggregateTiles, x, dynamic, static):
    return _forward(geo, tiles.forward, x, dynamic, static), (x, dynamic, static)


def _aggregate_bwd(geo: Geometry, tiles: AggregateTiles, residuals, dout):
    x, dynamic, static = residuals
    dx = _dx(geo, tiles.dx, dout, dynamic, static, x.dtype)
    ddyn, dstatic = _weight_grads(geo, tiles.weight_grads, x, dout, dynamic, static)
    return dx, ddyn, dstatic


_aggregate.defvjp(_aggregate_fwd, _aggregate_bwd)


def unsupported_reason(x, dynamic_kernel, static_kernel) -> str | None:
    """Why these (already shape-checked) arrays cannot run on the kernels, or None if they can."""
    return common.unsupported_reason("the Pallas kernels", x=x, dynamic_kernel=dynamic_kernel, static_kernel=static_kernel)


def resolve_tiles(fn: str, geo: Geometry, with_static: bool, tiles: AggregateTiles | None) -> AggregateTiles:
    """`tiles` with every None field taken from `default_tiles`; raises on tiles that cannot run."""
    if tiles is None:
        return default_tiles(geo, with_static)
    if not isinstance(tiles, AggregateTiles):
        raise ValueError(f"{fn}: tiles is a {type(tiles).__name__}; expected kernels.pallas.AggregateTiles(forward=, dx=, weight_grads=) or None.")
    for kernel, chosen in tiles._asdict().items():
        if chosen is not None:
            common.check_tiles(fn, kernel, chosen)
    defaults = default_tiles(geo, with_static)
    return AggregateTiles(*(default if chosen is None else chosen for chosen, default in zip(tiles, defaults)))


def aggregate(
    x, dynamic_kernel, static_kernel, *, kernel_size: int, stride: int, dilation: int,
    tiles: AggregateTiles | None = None, interpret: bool = False,
):
    """`kernels.reference.aggregate` as Pallas kernels, with a custom VJP of three more kernels.

    Args:
      x: `[B, H, W, C]`, C a multiple of 16, float32 or bfloat16.
      dynamic_kernel: `[B, Ho, Wo, G, K*K]` with `G = C // 16`, tap index `kh*K + kw`.
      static_kernel: `[K*K, C]` or None.
      kernel_size, stride, dilation: K (odd), s, d.
      tiles: the kernels' tiles; None, or a None field, takes the heuristic (`default_tiles`).
      interpret: run the kernels in Pallas's interpreter (any backend; slow, for tests).

    Returns:
      `[B, Ho, Wo, C]` in the dtype of `x`, accumulated in float32.

    Raises:
      ValueError: for a dtype or size the kernels do not take (use the XLA reference instead),
        or tiles they cannot run.
    """
    b, h, w, c = x.shape
    if kernel_size % 2 == 0 or c % GROUP_CHANNELS:
        raise ValueError(
            f"pallas.aggregate: needs an odd kernel_size and C a multiple of {GROUP_CHANNELS}; "
            f"got kernel_size={kernel_size}, C={c}. Validate through cvolution_jax.ops.aggregate."
        )
    reason = unsupported_reason(x, dynamic_kernel, static_kernel)
    if reason:
        raise ValueError(f"pallas.aggregate: {reason}. Use the XLA reference (impl='xla') for these inputs.")
    geo = Geometry(b, h, w, c, kernel_size, stride, dilation, bool(interpret))
    tiles = resolve_tiles("pallas.aggregate", geo, static_kernel is not None, tiles)
    return _aggregate(geo, tiles, x, dynamic_kernel, static_kernel)
