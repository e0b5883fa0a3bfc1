"""What each Pallas kernel must move, and the time that predicts, at the `kernels.bench` shapes.

    python -m kernels.traffic          # writes benchmarks/kernel_bytes_model.md

Two bounds per kernel, in bytes between the chip and HBM, from the kernels' loads and their tiles
(`kernels.pallas`, `kernels.fused`):

- one pass: every array read or written once, as if L1/L2 held every tap a program (or its
  neighbour) reads again: the K*K taps of `x` overlap, so this is the floor;
- taps from HBM: nothing reused between taps; each tap's masked load of a per-pixel array
  (`x`, `dout`, `Hd`, `v`) is fetched again in 32-byte sectors, so a group-shared `Hd` element
  costs a whole sector per tap (`Hd[..., g, t]` has the taps innermost). Out-of-image taps load
  nothing. The small weights (`S`, `W2`, `b`) stay in L2 and are counted once; writes once
  (L2 merges partial sectors before writing back).

Time is bytes over bandwidth: 3.0 TB/s (H100 SXM, a device-to-device copy) and 4.8 TB/s (H200,
its spec). The fused kernels also multiply: per tap a `[TW, Rp] @ [Rp, TC]` dot over the
channel-expanded span weight (16x the span conv's work), so their floor is also FLOPs over the
peak: fp32 dots at Precision.HIGHEST run on the CUDA cores (67 TFLOP/s on an H100 SXM), bf16 on
the tensor cores (989 TFLOP/s dense); the table gives that compute floor beside the bandwidth
times. Its "measured" column is empty here; `python -m kernels.gpu_check` fills it on a GPU with
each kernel's device time from a profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys

from jax.experimental import pallas as pl

from kernels import bench, common, fused, pallas, reference

SECTOR = 32  # bytes, the unit an L2 miss fetches
BANDWIDTHS = {"H100": 3.0e12, "H200": 4.8e12}  # bytes/s
PEAK_FLOPS = {"float32": 67e12, "bfloat16": 989e12}  # H100 SXM (H200 alike): CUDA-core fp32, dense bf16 tensor cores
FAMILIES = {
    "unfused": ("forward", "dx", "weight_grads"),
    "fused": ("fused_forward", "fused_dx", "fused_dv", "fused_weight_grads"),
}


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One kernel at one shape: bytes at both bounds and the dot FLOPs it runs."""

    kernel: str
    op: str
    dtype: str
    one_pass: int
    taps_from_hbm: int
    flops: int = 0


def valid_tap_pairs(op: bench.Op, dilation: int = 1) -> int:
    """(output pixel, tap) pairs whose tap lies inside the image, over the batch.

    Rows and columns are independent, so the count is B * (sum_i rows(i)) * (sum_j cols(j)),
    `rows(i)` the taps `kh` with `0 <= s*i + kh*d - p < H`.
    """
    k, s, h, ho = op.kernel_size, op.stride, op.size, op.out_size
    p = dilation * (k - 1) // 2
    per_axis = sum(1 for i in range(ho) for kh in range(k) if 0 <= s * i + kh * dilation - p < h)
    return op.batch * per_axis * per_axis


def kernel_traffic(op_name: str, op: bench.Op, itemsize: int, dtype: str) -> list[Traffic]:
    """Both bounds for every kernel of both families (C-volution: static kernel on)."""
    b, h, c, k, ho = op.batch, op.size, op.channels, op.kernel_size, op.out_size
    taps, groups, reduced = k * k, c // reference.GROUP_CHANNELS, c // 4
    x = b * h * h * c
    out = b * ho * ho * c
    hd = b * ho * ho * groups * taps
    static = taps * c
    v, span = b * ho * ho * reduced, reduced * groups * taps + groups * taps  # v; W2 and b
    pairs = valid_tap_pairs(op)
    e = itemsize
    tap_x = pairs * c * e  # every valid tap's [.., C] row of x (or dout), contiguous sectors
    tap_hd = pairs * groups * SECTOR  # one sector per group per valid tap

    rows = b * ho
    wg = pallas.weight_grad_tiles(rows, ho, c, with_static=True)
    ds_partials = pl.cdiv(rows, wg.rows) * pl.cdiv(ho, wg.width) * taps * c * 4 * 2  # written, then summed
    rows_traffic = [
        Traffic("forward", op_name, dtype, e * (x + hd + static + out), tap_x + tap_hd + e * (static + out)),
        Traffic("dx", op_name, dtype, e * (out + hd + static + x), tap_x + tap_hd + e * (static + x)),
        Traffic("weight_grads", op_name, dtype, e * (x + out + hd) + ds_partials, 2 * tap_x + e * hd + ds_partials),
    ]

    ft = fused.fused_tiles(ho, c, reduced)
    rp, cp = fused.padded(reduced), pl.cdiv(c, ft.channels) * ft.channels
    channel_tiles = pl.cdiv(c, ft.channels)
    # v is read per tap by every channel tile (forward, weights: at every output pixel; dx: at
    # the valid source pixels only).
    v_all_taps = channel_tiles * b * ho * ho * taps * reduced * e
    v_valid_taps = channel_tiles * pairs * reduced * e
    small = e * (span + static)
    wt = fused.weight_tiles(rows, ho, c, reduced, k)
    parts = pl.cdiv(rows, wt.rows) * pl.cdiv(ho, wt.width)
    partials = parts * (reduced * groups * taps + groups * taps + taps * c) * 4 * 2
    dot = 2 * taps * rp * cp  # per pixel: one [1, Rp] @ [Rp, C] per tap
    rows_traffic += [
        Traffic("fused_forward", op_name, dtype, e * (x + v + out) + small, tap_x + v_all_taps + e * out + small, b * ho * ho * dot),
        Traffic("fused_dx", op_name, dtype, e * (out + v + x) + small, tap_x + v_valid_taps + e * x + small, b * h * h * dot),
        Traffic("fused_dv", op_name, dtype, e * (x + out + v) + small, tap_x + e * (out + v) + small, b * ho * ho * dot),
        Traffic("fused_weight_grads", op_name, dtype, e * (x + out + v) + partials, 2 * tap_x + v_all_taps + partials, b * ho * ho * dot),
    ]
    return rows_traffic


def _us(nbytes: float, rate: float) -> str:
    return f"{nbytes / rate * 1e6:.1f}"


def table(rows: list[Traffic], measured: dict[tuple[str, str, str], float] | None = None) -> list[str]:
    """The model's markdown table; `measured`: `{(kernel, op, dtype): microseconds}` for its last column."""
    measured = measured or {}
    lines = [
        "| kernel | op | dtype | one pass (MB) | taps from HBM (MB) | H100 one pass (us) | H100 taps (us) "
        "| H200 one pass (us) | H200 taps (us) | dot GFLOP | compute floor (us) | measured (us) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    h100, h200 = BANDWIDTHS["H100"], BANDWIDTHS["H200"]
    for r in rows:
        gflop = f"{r.flops / 1e9:.1f}" if r.flops else ""
        compute = f"{r.flops / PEAK_FLOPS[r.dtype] * 1e6:.1f}" if r.flops else ""
        seen = measured.get((r.kernel, r.op, r.dtype))
        lines.append(
            f"| {r.kernel} | {r.op} | {r.dtype} | {r.one_pass / 1e6:.1f} | {r.taps_from_hbm / 1e6:.1f} "
            f"| {_us(r.one_pass, h100)} | {_us(r.taps_from_hbm, h100)} | {_us(r.one_pass, h200)} "
            f"| {_us(r.taps_from_hbm, h200)} | {gflop} | {compute} | {'' if seen is None else f'{seen:.1f}'} |"
        )
    return lines


def markdown(rows: list[Traffic]) -> str:
    """The table of `benchmarks/kernel_bytes_model.md`."""
    lines = [
        "# Bytes each Pallas kernel moves, and the time that predicts",
        "",
        f"- date: {datetime.date.today().isoformat()}; command: `python -m kernels.traffic` (a model: nothing ran on a GPU)",
        "- shapes: the `kernels.bench` RedNet-50 ops at batch 64, C-volution (static kernel on); tiles as "
        "`kernels.pallas` / `kernels.fused` choose them",
        "- one pass: each array moved once (perfect L1/L2 reuse of the K*K taps); taps from HBM: each valid "
        "tap's loads of x, dout, Hd, v fetched again in 32-byte sectors, weights and writes once "
        "(see `kernels/traffic.py`)",
        "- time = bytes / bandwidth at 3.0 TB/s (H100 SXM, measured copy) and 4.8 TB/s (H200 spec); compute floor "
        "(fused kernels' dots) = FLOPs / peak: fp32 67 TFLOP/s (CUDA cores), bf16 989 TFLOP/s (tensor cores)",
        "- measured: empty until the first GPU run; `python -m kernels.gpu_check` fills it in its report",
        "",
        *table(rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pathlib.Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m kernels.traffic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/kernel_bytes_model.md")
    args = parser.parse_args(argv)
    problem = common.output_problem(args.out, folder=False)
    if problem:
        parser.error(f"--out {args.out}: {problem}.")
    rows = []
    for family in FAMILIES:
        for name, op in bench.REDNET50_OPS.items():
            for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
                rows += [r for r in kernel_traffic(name, op, itemsize, dtype) if r.kernel in FAMILIES[family]]
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(rows))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
