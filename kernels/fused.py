"""Fused kernel generation + aggregation: the dynamic kernel `Hd` never touches memory.

The last layer of the kernel generator is a 1x1 convolution `Hd = v @ W2 + b`, with the
generator's features `v: [B, Ho, Wo, R]` (R = C/4), `W2: [R, G*K*K]`, `b: [G*K*K]` and
generated channel `g*K*K + kh*K + kw`. Instead of writing `Hd` (`|x| * K*K/16`, 3x `|x|` for
K=7) and reading it back, every kernel here recomputes the part of `Hd` it needs from `v`
(`|x| / 4`) in registers:

    out[b, i, j, c] = sum_t (Hd_t[b, i, j, c // 16] + S[t, c]) * x_pad[b, s*i + kh*d, s*j + kw*d, c]
    Hd_t[p, g]      = sum_r v[p, r] * W2[r, g*K*K + t] + b[g*K*K + t]

Per tap `t`, a program multiplies its `[TW, R]` tile of `v` by the *channel-expanded* span
weight `W2_t[r, c] = W2[r, (c // 16)*K*K + t]` (`[R, TC]`, gathered from the small `W2`, which
stays in L1/L2): `jnp.dot`s over chunks of R give the tap's weight for every lane of the
`[TW, TC]` output tile, already broadcast over the 16 channels of each group. This does 16x the span conv's
multiply-adds (each group's value is computed once per channel), but on tensor cores, with no
register shuffles; a group-space product would need a per-tap column extraction that Triton
cannot express cheaply. Triton's `tl.dot` needs every dimension >= 16, so `TW`, `TC` and the
padded `R` (`Rp`) are all at least 16; padded rows of `v`/`W2` load as zero.

Kernels (all tiles power-of-two, ragged borders masked, float32 accumulation):

- forward `[B*Ho, Wo/TW, C/TC]`: recomputes `Hd_t` per tap and aggregates at once.
- `dx` `[B*H, W/TW, C/TC]`: the gather form of `kernels.pallas`; per tap it gathers the rows of
  `v` at the output pixels that read this input tile and recomputes their `Hd_t`.
- `dv` `[B*Ho, Wo/TW]`: with `P_t = dout * x_tap_t` (`[TW, TC]`), `dHd` is the group sum of
  `P_t`, so `dv = sum_t dHd_t @ W2_t^T = sum_t P_t @ W2_t^T` over the expanded weight: no group
  reduction and no `Hd` at all. A program owns all channels of its pixels (looping over
  channel chunks), so `dv` is written once, without partial sums.
- `dW2`, `db`, `dS` `[blocks, Wo/TW, C/TC]`: per tap, `v^T @ P_t` (`[Rp, TC]`) and the column sums
  of `P_t` accumulate over a block of output rows; group sums of them are `dW2` and `db`, the
  column sums themselves `dS`. Each block writes its own partial sums (float32); `jnp.sum` over
  blocks finishes them (a fixed order: deterministic, no atomics).

What touches memory: forward reads `x`, `v`, `W2`, `b`, `S`, writes `out`; backward reads
`dout`, `x`, `v` (each twice or three times, once per kernel), `W2`, `b`, `S`, writes `dx`,
`dv` and the weight partial sums. Neither `Hd` nor `dHd` is ever stored: `dHd` exists only as
`P_t` in registers, reduced straight into `dv`, `dW2`, `db`.

Offsets are int32 (every array < 2**31 elements). `interpret=True` runs the same kernels in
Pallas's interpreter on any backend (CPU tests; slow).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import common, reference
from kernels.common import GROUP_CHANNELS, Geometry, Tiles, load, store

DOT_MIN = 16  # Triton's tl.dot needs M, N, K >= 16
# Bound on the float32 dW2 partial sums (one [R, G*K*K] matrix per row block): 64 MB.
# For C=512, K=7 that is 83 blocks of 200K floats; small layers stay at WEIGHT_GRAD_PROGRAMS.
WEIGHT_PARTIAL_FLOATS = 16 * 2**20
CONTRACTION = 16  # rows of R per dot in the forward and dx kernels (see fused_tiles)


class FusedTiles(NamedTuple):
    """Tiles of the four fused kernels, as jax's attention kernels take `BlockSizes`.

    A field left None takes the heuristic (`default_tiles`). Every TW and TC is at least 16
    (`DOT_MIN`); `contraction` of the forward and `dx` tiles is 0 (one dot over all of R) or a
    power of two from 16 to Rp.
    """

    forward: Tiles | None = None
    dx: Tiles | None = None
    dv: Tiles | None = None
    weight_grads: Tiles | None = None


def fused_tiles(width: int, channels: int, reduced: int = DOT_MIN) -> Tiles:
    """Tiles of the forward, `dx` and `dv` kernels: one `[TW, TC]` tile of one row.

    TW is the row rounded up to a power of two, at least 16 (the dot's M) and at most 32; TC
    at most 64. The forward and `dx` contract `v` with the expanded span weight in chunks of
    `CONTRACTION` rows of R (Rp up to 128 in RedNet-50), so their dot operands stay
    `[TW, RC]` and `[RC, TC]` whatever R is. Warps for 8 tile elements per thread (the tile's
    `Hd_t` and dot operands share the thread's registers with the accumulator): at 16, fp32
    needed 143-161 registers from C=256 on; at 8, 48-80 (sm_90). Not yet timed on a GPU.

    Args:
      width: columns of the array the kernel writes.
      channels: C.
      reduced: R, the channels of `v`.
    """
    tw = min(max(pl.next_power_of_2(width), DOT_MIN), 32)
    tc = min(pl.next_power_of_2(channels), 64)
    contraction = min(padded(reduced), CONTRACTION)
    return Tiles(tw, tc, 1, common.warps(tw * tc, 8), 1, contraction)


def weight_tiles(rows: int, width: int, channels: int, reduced: int, kernel_size: int) -> Tiles:
    """Tiles of the `dW2`/`db`/`dS` kernel: `[TW, TC]` tiles over a block of output rows.

    About `common.WEIGHT_GRAD_PROGRAMS` programs, but few enough blocks that the `dW2` partial
    sums (`blocks * Wo/TW` matrices of `[R, G*K*K]` floats) stay under `WEIGHT_PARTIAL_FLOATS`.
    Warps by the larger of its `[TW, TC]` tiles and the `[Rp, TC]` dW2 accumulator, 16 elements
    per thread: with warps by `[TW, TC]` alone it took 211 to 246 registers per thread from
    C=256 on (2 warps; sm_90).

    Args:
      rows: B * Ho.
      width: Wo.
      channels: C.
      reduced: R, the channels of `v`.
      kernel_size: K.
    """
    base = fused_tiles(width, channels, reduced)
    col_tiles = pl.cdiv(width, base.width)
    tiles_per_row = col_tiles * pl.cdiv(channels, base.channels)
    per_partial = reduced * (channels // GROUP_CHANNELS) * kernel_size**2
    max_blocks = max(1, WEIGHT_PARTIAL_FLOATS // (per_partial * col_tiles))
    blocks = min(rows, max_blocks, max(1, pl.cdiv(common.WEIGHT_GRAD_PROGRAMS, tiles_per_row)))
    return base._replace(rows=pl.cdiv(rows, blocks), num_warps=common.warps(max(base.width, padded(reduced)) * base.channels))


def dv_tiles(width: int, channels: int, reduced: int) -> Tiles:
    """Tiles of the `dv` kernel: those of `fused_tiles`, warps by its largest tile.

    A program holds the `[TW, TC]` product `P_t`, a `[TW, Rp]` accumulator and, per tap, the
    `[TC, Rp]` transposed span weight as a dot operand; 16 elements per thread of the largest.
    With 8 per thread of `[TW, TC]` alone it spilled at C=512 in float32 (sm_90).
    """
    base = fused_tiles(width, channels, reduced)
    return base._replace(num_warps=common.warps(max(base.width, padded(reduced)) * max(base.width, base.channels)))


def padded(reduced: int) -> int:
    """Rp: R padded to a power of two the dots take."""
    return max(pl.next_power_of_2(reduced), DOT_MIN)


@dataclasses.dataclass(frozen=True)
class FusedGeometry(Geometry):
    """`kernels.common.Geometry` plus the generator's width R and whether the dots run in bfloat16."""

    reduced: int = 0
    bf16_dots: bool = False

    @property
    def reduced_padded(self) -> int:
        return padded(self.reduced)

    @property
    def span_width(self) -> int:
        return self.groups * self.taps  # G*K*K, the columns of W2


def _dot(a, b, geo: FusedGeometry):
    """`a @ b` accumulated in float32.

    float32 operands ask for IEEE precision: Triton's default for them is TF32 (10-bit
    mantissa, ~1e-3 relative), far outside the 1e-5 float32 tolerance. bfloat16 operands (when
    `v` is bfloat16) run on the bf16 tensor cores; float32 products such as `P_t` are rounded
    to bfloat16 first (relative 2**-9, inside the 1e-2 bf16 tolerance).
    """
    if geo.bf16_dots:
        return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return jnp.dot(a, b, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _span_weight(v_ref, v_rows, v_ok, w_ref, b_ref, chans, t, geo: FusedGeometry, tiles: Tiles):
    """`Hd_t` for every lane of a `[TW, TC]` tile: `v[rows] @ W2_t + b_t`, fp32 `[TW, TC]`.

    The contraction over R runs in chunks of `tiles.contraction` rows of `v` (`[TW, RC]`) and of
    the expanded weight (`[RC, TC]`), reloaded per tap from L1/L2: a dot holds both operands in
    registers, and whole-R operands (R = 64, 128 from stage 3 on) spilled kilobytes per thread.

    Args:
      v_rows: `[TW, 1]` offset of each column's row of `v` (`pixel * R`); v_ok: `[TW, 1]` or a
        scalar, whether that pixel exists.
      chans: `[1, TC]` channels of the tile; t: the tap `kh*K + kw`.
    """
    rc = tiles.contraction or geo.reduced_padded  # 0: hand-made tiles, one dot over all of R
    lanes = jnp.arange(rc)
    group_base = (chans // GROUP_CHANNELS) * geo.taps + t  # [1, TC]: column of W2 and b
    chan_ok = chans < geo.channels
    bias = load(b_ref, group_base, chan_ok)

    def chunk(step, hd):
        red = step * rc + lanes
        v = load(v_ref, v_rows + red[None, :], v_ok & (red[None, :] < geo.reduced))  # [TW, RC]
        span = load(w_ref, red[:, None] * geo.span_width + group_base, chan_ok & (red[:, None] < geo.reduced))
        return hd + _dot(v, span, geo)

    hd = jnp.broadcast_to(bias, (tiles.width, tiles.channels))
    return lax.fori_loop(0, geo.reduced_padded // rc, chunk, hd)


def _forward_kernel(*refs, geo: FusedGeometry, tiles: Tiles, with_static: bool):
    x_ref, v_ref, w_ref, b_ref, static_ref, out_ref = common.split_refs(refs, 4, with_static)
    k, (h, w, c, ho, wo), rr = geo.kernel_size, geo.sizes, geo.reduced
    n, b, i = common.program_row(ho)  # output row n = b*Ho + i
    j, ch, out_ok = common.tile_ids(tiles, wo, c)

    # One tap per iteration, not unrolled: with the taps of a row unrolled, ptxas kept every
    # tap's dot operands live at once and spilled.
    def tap(t, acc):
        r, q, inside = common.tap_position(geo, i, j, lax.div(t, k), lax.rem(t, k))
        ok = out_ok & inside
        # Hd_t for every lane of the tile; outside the image x loads as 0, so it adds nothing.
        weight = _span_weight(v_ref, (n * wo + j) * rr, j < wo, w_ref, b_ref, ch, t, geo, tiles)
        if with_static:
            weight = weight + load(static_ref, t * c + ch, ch < c)
        return acc + weight * load(x_ref, ((b * h + r) * w + q) * c + ch, ok)

    acc = lax.fori_loop(0, geo.taps, tap, jnp.zeros((tiles.width, tiles.channels), jnp.float32))
    store(out_ref, (n * wo + j) * c + ch, acc, out_ok, geo.interpret)


def _dx_kernel(*refs, geo: FusedGeometry, tiles: Tiles, with_static: bool):
    dout_ref, v_ref, w_ref, b_ref, static_ref, dx_ref = common.split_refs(refs, 4, with_static)
    (k, s, d, p), (h, w, c, ho, wo), rr = geo.window, geo.sizes, geo.reduced
    m, b, r = common.program_row(h)  # input row m = b*H + r
    q, ch, in_ok = common.tile_ids(tiles, w, c)

    def tap(t, acc):  # not unrolled, as in the forward
        kh, kw = lax.div(t, k), lax.rem(t, k)
        i, row_ok = common.source_index(r, kh * d - p, s, ho)  # the output row reading row r via kh
        j, col_ok = common.source_index(q, kw * d - p, s, wo)  # [TW, 1]
        n = b * ho + i
        src_ok = row_ok & col_ok & (q < w)
        # Hd_t at the output pixels (n, j) this tile's columns feed: their rows of v.
        weight = _span_weight(v_ref, (n * wo + j) * rr, src_ok, w_ref, b_ref, ch, t, geo, tiles)
        if with_static:
            weight = weight + load(static_ref, t * c + ch, ch < c)
        return acc + weight * load(dout_ref, (n * wo + j) * c + ch, in_ok & src_ok)

    acc = lax.fori_loop(0, geo.taps, tap, jnp.zeros((tiles.width, tiles.channels), jnp.float32))
    store(dx_ref, (m * w + q) * c + ch, acc, in_ok, geo.interpret)


def _dv_kernel(x_ref, dout_ref, w_ref, dv_ref, *, geo: FusedGeometry, tiles: Tiles):
    k, (h, w, c, ho, wo), rr = geo.kernel_size, geo.sizes, geo.reduced
    n, b, i = common.program_row(ho)  # output row n = b*Ho + i
    j = pl.program_id(1) * tiles.width + jnp.arange(tiles.width)[:, None]  # [TW, 1]
    lanes = jnp.arange(tiles.channels)
    red = jnp.arange(geo.reduced_padded)[None, :]  # [1, Rp]

    def chunk(cb, acc):
        ch = cb * tiles.channels + lanes[None, :]  # [1, TC]
        ch_col = cb * tiles.channels + lanes[:, None]  # [TC, 1]
        ok_c = (j < wo) & (ch < c)
        dout = load(dout_ref, (n * wo + j) * c + ch, ok_c)
        # W2_t^T as [TC, Rp], gathered transposed so the dot needs no transpose.
        span_t_base = red * geo.span_width + (ch_col // GROUP_CHANNELS) * geo.taps
        span_t_ok = (red < rr) & (ch_col < c)

        def tap(t, acc):
            r, q, inside = common.tap_position(geo, i, j, lax.div(t, k), lax.rem(t, k))
            ok = ok_c & inside
            prod = dout * load(x_ref, ((b * h + r) * w + q) * c + ch, ok)  # P_t, dHd before its group sum
            return acc + _dot(prod, load(w_ref, span_t_base + t, span_t_ok), geo)

        return lax.fori_loop(0, geo.taps, tap, acc)

    acc = lax.fori_loop(0, pl.cdiv(c, tiles.channels), chunk, jnp.zeros((tiles.width, geo.reduced_padded), jnp.float32))
    store(dv_ref, (n * wo + j) * rr + red, acc, (j < wo) & (red < rr), geo.interpret)


def _weight_kernel(*refs, geo: FusedGeometry, tiles: Tiles, with_static: bool):
    x_ref, dout_ref, v_ref, dw_ref, db_ref, *rest = refs
    ds_ref = rest[0] if with_static else None
    k, c, ho, wo, rr = geo.kernel_size, geo.channels, geo.out_height, geo.out_width, geo.reduced
    rows, rp = geo.batch * ho, geo.reduced_padded
    tile_groups = tiles.channels // GROUP_CHANNELS
    block = pl.program_id(0)
    j, ch, col_ok = common.tile_ids(tiles, wo, c)
    # Program ids are read out here: the interpreter does not substitute them inside loops.
    part = block * pl.cdiv(wo, tiles.width) + pl.program_id(1)
    j_row = pl.program_id(1) * tiles.width + jnp.arange(tiles.width)[None, :]  # [1, TW], for v^T
    red = jnp.arange(rp)[:, None]  # [Rp, 1]
    g = pl.program_id(2) * tile_groups + jnp.arange(tile_groups)  # [TG]
    chans = pl.program_id(2) * tiles.channels + jnp.arange(tiles.channels)  # [TC]

    def tap(t, carry):
        kh, kw = lax.div(t, k), lax.rem(t, k)

        def row(step, accs):
            acc_w, acc_p = accs
            n = block * tiles.rows + step  # output row b*Ho + i
            n_ok = n < rows
            prod = common.tap_products(x_ref, dout_ref, geo, n, j, ch, kh, kw, col_ok & n_ok)
            v_t = load(v_ref, (n * wo + j_row) * rr + red, n_ok & (j_row < wo) & (red < rr))  # [Rp, TW]
            return acc_w + _dot(v_t, prod, geo), acc_p + prod

        zeros = jnp.zeros((tiles.width, tiles.channels), jnp.float32)
        acc_w, acc_p = lax.fori_loop(0, tiles.rows, row, (jnp.zeros((rp, tiles.channels), jnp.float32), zeros))
        # dW2[r, g*KK + t] and db[g*KK + t]: group sums of the per-channel sums (16 adjacent lanes).
        dw = acc_w.reshape(rp, tile_groups, GROUP_CHANNELS).sum(axis=-1)  # [Rp, TG]
        dw_offsets = ((part * rr + red) * geo.groups + g[None, :]) * geo.taps + t
        store(dw_ref, dw_offsets, dw, (red < rr) & (g[None, :] < geo.groups), geo.interpret)
        col_sums = acc_p.sum(axis=0)  # [TC]
        db = col_sums.reshape(tile_groups, GROUP_CHANNELS).sum(axis=-1)
        store(db_ref, (part * geo.groups + g) * geo.taps + t, db, g < geo.groups, geo.interpret)
        if with_static:
            store(ds_ref, (part * geo.taps + t) * c + chans, col_sums, chans < c, geo.interpret)
        return carry

    lax.fori_loop(0, geo.taps, tap, 0)


def default_tiles(geo: FusedGeometry) -> FusedTiles:
    """The heuristic tiles of every fused kernel for this aggregation."""
    rows, wo, c, r = geo.batch * geo.out_height, geo.out_width, geo.channels, geo.reduced
    return FusedTiles(
        forward=fused_tiles(wo, c, r),
        dx=fused_tiles(geo.width, c, r),
        dv=dv_tiles(wo, c, r),
        weight_grads=weight_tiles(rows, wo, c, r, geo.kernel_size),
    )


def resolve_tiles(fn: str, geo: FusedGeometry, tiles: FusedTiles | None) -> FusedTiles:
    """`tiles` with every None field taken from `default_tiles`; raises on tiles that cannot run."""
    if tiles is None:
        return default_tiles(geo)
    if not isinstance(tiles, FusedTiles):
        raise ValueError(f"{fn}: tiles is a {type(tiles).__name__}; expected kernels.fused.FusedTiles(forward=, dx=, dv=, weight_grads=) or None.")
    for kernel, chosen in tiles._asdict().items():
        if chosen is None:
            continue
        common.check_tiles(fn, kernel, chosen, min_size=DOT_MIN)
        rc, rp = chosen.contraction, geo.reduced_padded
        if kernel in ("forward", "dx") and rc and not (rc & (rc - 1) == 0 and DOT_MIN <= rc <= rp):
            raise ValueError(
                f"{fn}: tiles.{kernel} has contraction={rc}; expected 0 (all of R) or a power of two from {DOT_MIN} to "
                f"Rp={rp} (R={geo.reduced} padded). Fix it or pass None for the heuristic."
            )
    return FusedTiles(*(default if chosen is None else chosen for chosen, default in zip(tiles, default_tiles(geo))))


def _forward(geo: FusedGeometry, tiles: Tiles, x, v, w2, b, static):
    kernel = functools.partial(_forward_kernel, geo=geo, tiles=tiles, with_static=static is not None)
    grid = (geo.batch * geo.out_height, pl.cdiv(geo.out_width, tiles.width), pl.cdiv(geo.channels, tiles.channels))
    out_shape = jax.ShapeDtypeStruct((geo.batch * geo.out_height * geo.out_width * geo.channels,), x.dtype)
    out = geo.call(kernel, tiles, grid, out_shape, "cvolution_fused_forward", x, v, w2, b, static)
    return out.reshape(geo.batch, geo.out_height, geo.out_width, geo.channels)


def _dx(geo: FusedGeometry, tiles: Tiles, dout, v, w2, b, static, dtype):
    kernel = functools.partial(_dx_kernel, geo=geo, tiles=tiles, with_static=static is not None)
    grid = (geo.batch * geo.height, pl.cdiv(geo.width, tiles.width), pl.cdiv(geo.channels, tiles.channels))
    out_shape = jax.ShapeDtypeStruct((geo.batch * geo.height * geo.width * geo.channels,), dtype)
    dx = geo.call(kernel, tiles, grid, out_shape, "cvolution_fused_dx", dout, v, w2, b, static)
    return dx.reshape(geo.batch, geo.height, geo.width, geo.channels)


def _dv(geo: FusedGeometry, tiles: Tiles, x, dout, w2, v):
    grid = (geo.batch * geo.out_height, pl.cdiv(geo.out_width, tiles.width))
    kernel = functools.partial(_dv_kernel, geo=geo, tiles=tiles)
    dv = geo.call(kernel, tiles, grid, jax.ShapeDtypeStruct((v.size,), v.dtype), "cvolution_fused_dv", x, dout, w2)
    return dv.reshape(v.shape)


def _weight_grads(geo: FusedGeometry, tiles: Tiles, x, dout, v, w2, b, static):
    with_static = static is not None
    rows = geo.batch * geo.out_height
    grid = (pl.cdiv(rows, tiles.rows), pl.cdiv(geo.out_width, tiles.width), pl.cdiv(geo.channels, tiles.channels))
    parts = grid[0] * grid[1]  # one partial sum per (row block, column tile); channel tiles are disjoint
    out_shape = [
        jax.ShapeDtypeStruct((parts * w2.size,), jnp.float32),
        jax.ShapeDtypeStruct((parts * b.size,), jnp.float32),
    ]
    if with_static:
        out_shape.append(jax.ShapeDtypeStruct((parts * geo.taps * geo.channels,), jnp.float32))
    kernel = functools.partial(_weight_kernel, geo=geo, tiles=tiles, with_static=with_static)
    grads = geo.call(kernel, tiles, grid, out_shape, "cvolution_fused_weight_grads", x, dout, v)
    # Fixed-order sums over the blocks: deterministic.
    dw2 = grads[0].reshape(parts, *w2.shape).sum(axis=0).astype(w2.dtype)
    db = grads[1].reshape(parts, *b.shape).sum(axis=0).astype(b.dtype)
    ds = grads[2].reshape(parts, geo.taps, geo.channels).sum(axis=0).astype(static.dtype) if with_static else None
    return dw2, db, ds


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(geo: FusedGeometry, tiles: FusedTiles, x, v, w2, b, static):
    return _forward(geo, tiles.forward, x, v, w2, b, static)


def _fused_fwd(geo: FusedGeometry, tiles: FusedTiles, x, v, w2, b, static):
    # Residuals are the inputs only: Hd is recomputed by the backward kernels, never saved.
    return _forward(geo, tiles.forward, x, v, w2, b, static), (x, v, w2, b, static)


def _fused_bwd(geo: FusedGeometry, tiles: FusedTiles, residuals, dout):
    x, v, w2, b, static = residuals
    dx = _dx(geo, tiles.dx, dout, v, w2, b, static, x.dtype)
    dv = _dv(geo, tiles.dv, x, dout, w2, v)
    dw2, db, ds = _weight_grads(geo, tiles.weight_grads, x, dout, v, w2, b, static)
    return dx, dv, dw2, db, ds


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_aggregate(
    x, v, span_kernel, span_bias, static_kernel, *, kernel_size: int, stride: int, dilation: int,
    tiles: FusedTiles | None = None, interpret: bool = False,
):
    """`reference.aggregate(x, (v @ W2 + b).reshape(B, Ho, Wo, G, K*K), S)` without materialising Hd.

    Args:
      x: `[B, H, W, C]`, C a multiple of 16, float32 or bfloat16.
      v: `[B, Ho, Wo, R]`, the generator's features before its span conv (R = C/4 in the layers).
      span_kernel: `W2`, `[R, G*K*K]` or flax's `[1, 1, R, G*K*K]`; column `g*K*K + kh*K + kw`.
      span_bias: `b`, `[G*K*K]`.
      static_kernel: `[K*K, C]` or None.
      kernel_size, stride, dilation: K (odd), s, d.
      tiles: the kernels' tiles; None, or a None field, takes the heuristic (`default_tiles`).
      interpret: run the kernels in Pallas's interpreter (any backend; slow, for tests).

    Returns:
      `[B, Ho, Wo, C]` in the dtype of `x`, accumulated in float32 (Hd is never rounded to the
      input dtype, unlike the unfused bfloat16 path, which stores it).

    Raises:
      ValueError: for shapes that do not fit together, dtypes/sizes the kernels do not take, or
        tiles they cannot run.
    """
    bsz, h, w, c = x.shape
    if kernel_size % 2 == 0 or c % GROUP_CHANNELS:
        raise ValueError(
            f"fused_aggregate: needs an odd kernel_size and C a multiple of {GROUP_CHANNELS}; "
            f"got kernel_size={kernel_size}, C={c}."
        )
    ho, wo = reference.output_size(h, stride), reference.output_size(w, stride)
    span_width = (c // GROUP_CHANNELS) * kernel_size**2
    if v.ndim != 4 or v.shape[:3] != (bsz, ho, wo):
        raise ValueError(f"fused_aggregate: v has shape {tuple(v.shape)}; expected [B, Ho, Wo, R] = [{bsz}, {ho}, {wo}, R] for x {tuple(x.shape)}, stride {stride}.")
    reduced = v.shape[-1]
    w2 = span_kernel.reshape(-1, span_kernel.shape[-1])
    if w2.shape != (reduced, span_width) or span_bias.shape != (span_width,):
        raise ValueError(
            f"fused_aggregate: span_kernel {tuple(span_kernel.shape)} and span_bias {tuple(span_bias.shape)} must be "
            f"[R, G*K*K] = [{reduced}, {span_width}] and [{span_width}] (G = C/16 = {c // GROUP_CHANNELS}, K = {kernel_size})."
        )
    if static_kernel is not None and static_kernel.shape != (kernel_size**2, c):
        raise ValueError(f"fused_aggregate: static_kernel has shape {tuple(static_kernel.shape)}; expected [K*K, C] = [{kernel_size**2}, {c}].")
    reason = unsupported_reason(x, v, w2, span_bias, static_kernel)
    if reason:
        raise ValueError(f"fused_aggregate: {reason}. Use the unfused path (KernelGenerator + ops.aggregate).")
    geo = FusedGeometry(
        bsz, h, w, c, kernel_size, stride, dilation, bool(interpret),
        reduced=reduced, bf16_dots=jnp.dtype(v.dtype) == jnp.bfloat16,
    )
    return _fused(geo, resolve_tiles("fused_aggregate", geo, tiles), x, v, w2, span_bias, static_kernel)


def unsupported_reason(x, features, span_kernel, span_bias, static_kernel) -> str | None:
    """Why these arrays cannot run on the fused kernels (dtype, int32 offsets), or None if they can."""
    return common.unsupported_reason(
        "the fused kernels", x=x, features=features, span_kernel=span_kernel, span_bias=span_bias, static_kernel=static_kernel,
    )
