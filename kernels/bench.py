"""Times the Pallas aggregation against the XLA reference on the RedNet-50 shapes.

    python -m kernels.bench                          # on a GPU: batch 64, fp32 and bf16
    python -m kernels.bench --smoke --out-dir /tmp   # anywhere: tiny shapes, interpret mode off GPU

For every aggregation of RedNet/CedNet-50 at 224x224 (the 3x3 stem op and the 7x7 op of each
stage, the stride-2 transitions included), each dtype, and both the forward and the forward +
backward pass, it times the Pallas kernels (`kernels.pallas`), the XLA reference
(`kernels.reference`) and a copy that moves the same bytes (the bandwidth roof), and writes
`aggregate_<date>_<device>.json` and `.md` to `--out-dir` (default `benchmarks/`) with the
device, the date, the jax/jaxlib/plugin versions and the command.

Traffic model (the spec's cost model, unfused, each array moved once):
- forward: read x, read Hd, read S, write out: `|x| + |Hd| + |S| + |out|`;
- forward + backward adds read dout, x, Hd, S and write dx, dHd, dS: `2|x| + 2|Hd| + 2|S| + |out|` more.
Achieved GB/s is that many bytes over the measured time; "% of copy" compares it with the copy,
a jitted `a + 1` over an array of half those bytes (read + write = the same bytes).

Fused rows (`kernels.fused`, where the dynamic kernel never touches memory): the tail of a
C-volution layer, the generator's span conv `Hd = v @ W2 + b` plus the aggregation, unfused
(Hd written by XLA, then the Pallas aggregation) against fused (Hd recomputed per tile), forward
and forward + backward, with the time and the compiled program's temporary memory (XLA's
memory analysis: what the pass allocates beyond its inputs and outputs). The generator's earlier
convolutions are the same in both and left out. `--no-fused` skips these rows.

Off GPU only `--smoke` runs: there the kernels run in Pallas's interpreter and the times say
nothing about performance; the smoke run checks that the whole benchmark works end to end.

`--xla-backward` (any backend, meant for CPU) times the XLA path alone, forward and forward +
backward of all inputs, beside a depthwise KxK convolution of the same shape (`lax.conv`,
forward + backward of input and kernel), the plain-autodiff oracle
(`reference.aggregate_autodiff`) and, given `--involution-code PATH` to the involution authors'
`involution_naive.py` (github.com/d-li14/involution, MIT; not part of this project, needs
torch), their unfold-based PyTorch aggregation with its generator replaced by the same `Hd`.
Ratios are taken within one run:

    python -m kernels.bench --xla-backward --involution-code build/involution/involution_naive.py
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp

from kernels import common, fused, pallas, reference

PASSES = ("forward", "forward+backward")
IMPLS = ("pallas", "xla", "copy")


@dataclasses.dataclass(frozen=True)
class Op:
    """One aggregation: x `[batch, size, size, channels]`, kernel K, stride s, dilation 1."""

    batch: int
    size: int
    channels: int
    kernel_size: int
    stride: int

    @property
    def out_size(self) -> int:
        return reference.output_size(self.size, self.stride)

    def shapes(self, with_static: bool = True) -> list[tuple[int, ...]]:
        """Shapes of x `[B, H, W, C]`, Hd `[B, Ho, Wo, G, K*K]` and (with_static) S `[K*K, C]`."""
        b, h, c, k, ho = self.batch, self.size, self.channels, self.kernel_size, self.out_size
        shapes = [(b, h, h, c), (b, ho, ho, c // reference.GROUP_CHANNELS, k * k)]
        return shapes + [(k * k, c)] if with_static else shapes


# RedNet/CedNet-50 at 224x224, batch 64: the stem's op(32, K=3) at 112x112, then the 7x7 op of
# each stage, whose first block strides (56 -> 28 -> 14 -> 7) except in stage 1.
REDNET50_OPS = {
    "stem_c32_k3": Op(64, 112, 32, 3, 1),
    "stage1_c64": Op(64, 56, 64, 7, 1),
    "stage2_c128_s2": Op(64, 56, 128, 7, 2),
    "stage2_c128": Op(64, 28, 128, 7, 1),
    "stage3_c256_s2": Op(64, 28, 256, 7, 2),
    "stage3_c256": Op(64, 14, 256, 7, 1),
    "stage4_c512_s2": Op(64, 14, 512, 7, 2),
    "stage4_c512": Op(64, 7, 512, 7, 1),
}
SMOKE_OPS = {"smoke_c32_k7_s2": Op(1, 10, 32, 7, 2)}  # one tiny op: the smoke run is mostly compiling


def traffic_bytes(op: Op, itemsize: int, pass_: str, with_static: bool = True) -> int:
    """Bytes the traffic model says `pass_` moves (see the module docstring)."""
    x, hd, *static = (math.prod(shape) for shape in op.shapes(with_static))
    s = static[0] if static else 0
    out = op.batch * op.out_size**2 * op.channels
    forward = x + hd + s + out
    backward = out + 2 * x + 2 * hd + 2 * s
    return itemsize * (forward if pass_ == "forward" else forward + backward)


def time_calls(fn, args, *, iters: int, warmup: int, repeats: int) -> float:
    """Median over `repeats` of the mean seconds per call over `iters` back-to-back calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            result = fn(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def _jitted(impl: str, op: Op, pass_: str, interpret: bool):
    config = dict(kernel_size=op.kernel_size, stride=op.stride, dilation=1)
    if impl == "pallas":
        aggregate = lambda x, hd, s: pallas.aggregate(x, hd, s, **config, interpret=interpret)
    else:
        aggregate = lambda x, hd, s: reference.aggregate(x, hd, s, **config)
    if pass_ == "forward":
        return jax.jit(lambda x, hd, s, g: aggregate(x, hd, s))

    def forward_backward(x, hd, s, g):
        out, vjp = jax.vjp(aggregate, x, hd, s)
        return out, vjp(g)

    return jax.jit(forward_backward)


def run_op(name: str, op: Op, dtype, *, with_static: bool, interpret: bool, iters: int, warmup: int, repeats: int) -> list[dict]:
    """Rows (one per pass and implementation) for one op in one dtype."""
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = op.shapes(with_static)
    x, hd, *static = (jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes))
    s = static[0] if static else None
    g = jax.random.normal(keys[3], (op.batch, op.out_size, op.out_size, op.channels), dtype)
    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    for pass_ in PASSES:
        nbytes = traffic_bytes(op, itemsize, pass_, with_static)
        times = {}
        for impl in ("pallas", "xla"):
            times[impl] = time_calls(_jitted(impl, op, pass_, interpret), (x, hd, s, g), iters=iters, warmup=warmup, repeats=repeats)
        # Half the bytes in, half out: the same traffic as the model, at the best the chip does.
        buffer = jnp.zeros((nbytes // 2 // itemsize,), dtype)
        times["copy"] = time_calls(jax.jit(lambda a: a + 1), (buffer,), iters=iters, warmup=warmup, repeats=repeats)
        del buffer
        for impl in IMPLS:
            gb_per_s = nbytes / times[impl] / 1e9
            rows.append(dict(
                op=name, shape=dict(dataclasses.asdict(op), out_size=op.out_size), dtype=jnp.dtype(dtype).name,
                **{"pass": pass_}, impl=impl, time_ms=times[impl] * 1e3, bytes=nbytes, gb_per_s=gb_per_s,
                pct_of_copy=100 * times["copy"] / times[impl],
                speedup_vs_xla=None if impl == "copy" else times["xla"] / times[impl],
            ))
    return rows


def _temp_bytes(jitted, args) -> int | None:
    """Bytes of temporaries XLA allocates for one call (None where the backend does not say)."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def run_fused(name: str, op: Op, dtype, *, with_static: bool, interpret: bool, iters: int, warmup: int, repeats: int) -> list[dict]:
    """Rows (per pass: unfused, fused) for the span conv + aggregation of one op in one dtype."""
    b, ho, c, k = op.batch, op.out_size, op.channels, op.kernel_size
    reduced, groups = c // 4, c // reference.GROUP_CHANNELS
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (b, op.size, op.size, c), dtype)
    v = jax.random.normal(keys[1], (b, ho, ho, reduced), dtype)
    w2 = (jax.random.normal(keys[2], (reduced, groups * k * k)) / reduced**0.5).astype(dtype)
    bias = jnp.zeros((groups * k * k,), dtype)
    s = jax.random.normal(keys[3], (k * k, c), dtype) if with_static else None
    g = jax.random.normal(keys[4], (b, ho, ho, c), dtype)
    config = dict(kernel_size=k, stride=op.stride, dilation=1, interpret=interpret)

    def unfused_layer(x, v, w2, bias, s):
        # The unfused layer's span conv writes Hd in the layer's dtype.
        hd = reference.dynamic_kernel(v, w2, bias, kernel_size=k).astype(dtype)
        return pallas.aggregate(x, hd, s, **config)

    def fused_layer(x, v, w2, bias, s):
        return fused.fused_aggregate(x, v, w2, bias, s, **config)

    rows = []
    for pass_ in PASSES:
        times, temps = {}, {}
        for impl, layer in (("unfused", unfused_layer), ("fused", fused_layer)):
            if pass_ == "forward":
                fn = jax.jit(lambda x, v, w2, bias, s, g, layer=layer: layer(x, v, w2, bias, s))
            else:
                def forward_backward(x, v, w2, bias, s, g, layer=layer):
                    out, vjp = jax.vjp(layer, x, v, w2, bias, s)
                    return out, vjp(g)

                fn = jax.jit(forward_backward)
            args = (x, v, w2, bias, s, g)
            temps[impl] = _temp_bytes(fn, args)
            times[impl] = time_calls(fn, args, iters=iters, warmup=warmup, repeats=repeats)
        for impl in ("unfused", "fused"):
            rows.append(dict(
                op=name, shape=dict(dataclasses.asdict(op), out_size=op.out_size), dtype=jnp.dtype(dtype).name,
                **{"pass": pass_}, impl=impl, time_ms=times[impl] * 1e3, temp_bytes=temps[impl],
                speedup_vs_unfused=times["unfused"] / times[impl],
                temp_vs_unfused=None if not temps["unfused"] or temps[impl] is None else temps[impl] / temps["unfused"],
            ))
    return rows


# The XLA path on CPU: small enough for a 2-core machine, one stride-2 op and the stem's K=3, and
# the Fashion-MNIST ablation backbone's two 7x7 ops at its batch of 128 (many images, few channels).
XLA_BACKWARD_OPS = {
    "c128_k7": Op(8, 28, 128, 7, 1),
    "c128_k7_s2": Op(8, 28, 128, 7, 2),
    "stem_c32_k3": Op(8, 56, 32, 3, 1),
    "fmnist_c16_k7": Op(128, 14, 16, 7, 1),
    "fmnist_c32_k7_s2": Op(128, 14, 32, 7, 2),
}
XLA_BACKWARD_IMPLS = ("xla", "xla_autodiff", "depthwise_conv", "torch_involution_naive")
TORCH_NOT_RUN = "not run (torch / involution code not available)"


def _torch_involution(path: str | None):
    """The `involution` class of the authors' `involution_naive.py`, or None without torch or file.

    Their file imports `mmcv.cnn.ConvModule`; a minimal stand-in (conv, optional BN and ReLU) is
    provided so mmcv need not be installed. Only the aggregation is timed, so it barely matters.
    """
    if not path or not pathlib.Path(path).is_file():
        return None
    try:
        import torch
    except ImportError:
        return None

    class ConvModule(torch.nn.Sequential):
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, conv_cfg=None, norm_cfg=None, act_cfg=None):
            layers = [torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=norm_cfg is None)]
            layers += [torch.nn.BatchNorm2d(out_channels)] if norm_cfg else []
            layers += [torch.nn.ReLU()] if act_cfg else []
            super().__init__(*layers)

    mmcv, mmcv_cnn = types.ModuleType("mmcv"), types.ModuleType("mmcv.cnn")
    mmcv_cnn.ConvModule, mmcv.cnn = ConvModule, mmcv_cnn
    saved = {name: sys.modules.get(name) for name in ("mmcv", "mmcv.cnn")}
    sys.modules.update({"mmcv": mmcv, "mmcv.cnn": mmcv_cnn})
    try:
        spec = importlib.util.spec_from_file_location("involution_naive", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module.involution


def _time_torch(op: Op, involution_cls, pass_: str, *, iters: int, warmup: int, repeats: int) -> float:
    """Seconds per call of the authors' unfold aggregation, its generator replaced by a fixed `Hd`."""
    import torch

    class Given(torch.nn.Module):  # stands in for the generator: returns the same Hd for any input
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, _):
            return self.weight

    b, h, c, k, ho = op.batch, op.size, op.channels, op.kernel_size, op.out_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, h, generator=gen, requires_grad=True)
    hd = torch.randn(b, c // reference.GROUP_CHANNELS * k * k, ho, ho, generator=gen, requires_grad=True)
    g = torch.randn(b, c, ho, ho, generator=gen)
    module = involution_cls(c, k, op.stride)
    module.conv1, module.conv2 = torch.nn.Identity(), Given(hd)

    def call():
        if pass_ == "forward":
            with torch.no_grad():
                return module(x)
        x.grad = hd.grad = None
        module(x).backward(g)

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def depthwise_conv(op: Op):
    """A depthwise KxK convolution of the op's shape (PyTorch's symmetric padding), `(x, w) -> y`."""
    pad = (op.kernel_size - 1) // 2
    return lambda x, w: jax.lax.conv_general_dilated(
        x, w, (op.stride, op.stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=op.channels,
    )


def jitted_pass(fn, pass_: str):
    if pass_ == "forward":
        return jax.jit(lambda *args: fn(*args[:-1]))

    def forward_backward(*args):
        out, vjp = jax.vjp(fn, *args[:-1])
        return out, vjp(args[-1])

    return jax.jit(forward_backward)


def run_xla_backward(name: str, op: Op, dtype, *, with_static: bool, involution_cls, iters: int, warmup: int, repeats: int) -> list[dict]:
    """Rows (per pass, per entry of `XLA_BACKWARD_IMPLS`) for the XLA path of one op.

    Each row has the time and the ratios of the run: `vs_forward` (this impl's forward + backward
    over its forward) and `xla_speedup` (this impl's time over the XLA path's, same pass).
    """
    keys = jax.random.split(jax.random.key(0), 5)
    shapes = op.shapes(with_static)
    x, hd, *static = (jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes))
    s = static[0] if static else None
    g = jax.random.normal(keys[3], (op.batch, op.out_size, op.out_size, op.channels), dtype)
    depthwise = jax.random.normal(keys[4], (op.kernel_size, op.kernel_size, 1, op.channels), dtype)
    config = dict(kernel_size=op.kernel_size, stride=op.stride, dilation=1)
    candidates = {
        "xla": (lambda x, hd, s: reference.aggregate(x, hd, s, **config), (x, hd, s, g)),
        "xla_autodiff": (lambda x, hd, s: reference.aggregate_autodiff(x, hd, s, **config), (x, hd, s, g)),
        "depthwise_conv": (depthwise_conv(op), (x, depthwise, g)),
    }
    times = {}
    for pass_ in PASSES:
        for impl, (fn, args) in candidates.items():
            # The autodiff oracle's backward is the slow path this replaces: a few calls suffice.
            n = min(iters, 2) if impl == "xla_autodiff" and pass_ != "forward" else iters
            times[impl, pass_] = time_calls(jitted_pass(fn, pass_), args, iters=n, warmup=warmup, repeats=repeats)
        if involution_cls is not None:
            times["torch_involution_naive", pass_] = _time_torch(op, involution_cls, pass_, iters=iters, warmup=warmup, repeats=repeats)
    rows = []
    for pass_ in PASSES:
        for impl in XLA_BACKWARD_IMPLS:
            t = times.get((impl, pass_))
            rows.append(dict(
                op=name, shape=dict(dataclasses.asdict(op), out_size=op.out_size), dtype=jnp.dtype(dtype).name,
                **{"pass": pass_}, impl=impl, time_ms=None if t is None else t * 1e3,
                vs_forward=None if t is None else t / times[impl, "forward"],
                xla_speedup=None if t is None else t / times["xla", pass_],
            ))
    return rows


def fmt(value, spec: str) -> str:
    """`value` formatted by `spec`, or "n/a" for a value not measured (None)."""
    return "n/a" if value is None else format(value, spec)


def _xla_backward_markdown(result: dict) -> str:
    lines = [
        "# The XLA path's forward and backward against a depthwise convolution and involution's PyTorch fallback",
        "",
        f"- device: {result['device']} ({result['platform']}, {result['device_count']} device(s)); "
        f"host CPUs: {result['cpu_count']}",
        f"- date: {result['date']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- command: `{result['command']}`",
        f"- static kernel (C-volution) in the XLA rows: {result['with_static']}; the PyTorch rows are involution's "
        f"aggregation (x and Hd only); iterations {result['iters']}, warm-up {result['warmup']}, median of {result['repeats']} repeats",
        f"- torch_involution_naive: {result['torch']}",
        "- `x fwd`: forward + backward over the same impl's forward; `vs xla`: the impl's time over the XLA path's, "
        "same pass (above 1: the XLA path is faster)",
        "",
        "| op | x shape | K | s | dtype | pass | impl | time (ms) | x fwd | vs xla |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        sh = r["shape"]
        time_ms = TORCH_NOT_RUN if r["time_ms"] is None else f"{r['time_ms']:.2f}"
        lines.append(
            f"| {r['op']} | {sh['batch']}x{sh['size']}x{sh['size']}x{sh['channels']} | {sh['kernel_size']} | {sh['stride']} "
            f"| {r['dtype']} | {r['pass']} | {r['impl']} | {time_ms} | {fmt(r['vs_forward'], '.1f')} | {fmt(r['xla_speedup'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def versions() -> dict:
    """jax, jaxlib, Python and CUDA plugin versions, for the header of every benchmark file."""
    versions = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"), "python": sys.version.split()[0]}
    # jax runs the Triton that XLA bundles in jaxlib / the CUDA plugin; a `triton` wheel is unrelated
    # but recorded when present.
    for dist in ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "triton", "torch"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions["triton_in_use"] = f"bundled with XLA in jaxlib {versions['jaxlib']} / the CUDA plugin"
    return versions


def _markdown(result: dict) -> str:
    lines = [
        f"# Aggregation benchmark{' (smoke run: interpret mode, times mean nothing)' if result['smoke'] else ''}",
        "",
        f"- device: {result['device']} ({result['platform']}, {result['device_count']} device(s))",
        f"- date: {result['date']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- command: `{result['command']}`",
        f"- static kernel (C-volution): {result['with_static']}; iterations {result['iters']}, "
        f"warm-up {result['warmup']}, median of {result['repeats']} repeats",
        "- traffic model: forward `|x| + |Hd| + |S| + |out|`; forward+backward adds "
        "`2|x| + 2|Hd| + 2|S| + |out|`; copy = jitted `a + 1` moving the same bytes",
        "",
        "| op | x shape | K | s | dtype | pass | impl | time (ms) | GB/s | % of copy | speedup vs xla |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        sh = r["shape"]
        lines.append(
            f"| {r['op']} | {sh['batch']}x{sh['size']}x{sh['size']}x{sh['channels']} | {sh['kernel_size']} | {sh['stride']} "
            f"| {r['dtype']} | {r['pass']} | {r['impl']} | {r['time_ms']:.3f} | {r['gb_per_s']:.0f} "
            f"| {r['pct_of_copy']:.0f} | {'' if r['speedup_vs_xla'] is None else format(r['speedup_vs_xla'], '.2f')} |"
        )
    if result.get("fused_rows"):
        lines += [
            "",
            "## Fused span conv + aggregation (`kernels.fused`) against unfused (`Hd` in memory, then `kernels.pallas`)",
            "",
            "| op | x shape | K | s | dtype | pass | impl | time (ms) | temp memory (MiB) | speedup vs unfused | memory vs unfused |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["fused_rows"]:
            sh = r["shape"]
            temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
            ratio = "n/a" if r["temp_vs_unfused"] is None else f"{r['temp_vs_unfused']:.2f}"
            lines.append(
                f"| {r['op']} | {sh['batch']}x{sh['size']}x{sh['size']}x{sh['channels']} | {sh['kernel_size']} | {sh['stride']} "
                f"| {r['dtype']} | {r['pass']} | {r['impl']} | {r['time_ms']:.3f} | {temp} | {r['speedup_vs_unfused']:.2f} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def _write(result: dict, prefix: str, markdown: str, out_dir: str, smoke: bool) -> list[pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-").lower()
    stamp = datetime.datetime.fromisoformat(result["date"]).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{prefix}_{stamp}_{slug}{'_smoke' if smoke else ''}"
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown)
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


def _select_ops(args, parser, full: dict[str, Op]) -> dict[str, Op]:
    """The ops `--ops` names among `full` (or the smoke op), all of them without `--ops`."""
    ops = SMOKE_OPS if args.smoke else full
    if not args.ops:
        return ops
    unknown = set(args.ops.split(",")) - set(ops)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {sorted(ops)}")
    return {name: ops[name] for name in args.ops.split(",")}


def _main_xla_backward(args, argv: list[str], parser) -> list[pathlib.Path]:
    ops = _select_ops(args, parser, XLA_BACKWARD_OPS)
    iters = args.iters or (1 if args.smoke else 3)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats or (1 if args.smoke else 5)
    involution_cls = _torch_involution(args.involution_code)
    torch_note = f"the authors' code at {args.involution_code}" if involution_cls else TORCH_NOT_RUN
    print(f"torch_involution_naive: {torch_note}", flush=True)
    rows = []
    dtypes = args.dtypes.split(",") if args.dtypes != parser.get_default("dtypes") else ["float32"]
    for name, op in ops.items():
        for dtype_name in dtypes:
            op_rows = run_xla_backward(
                name, op, jnp.dtype(dtype_name), with_static=not args.no_static, involution_cls=involution_cls,
                iters=iters, warmup=warmup, repeats=repeats,
            )
            for r in op_rows:
                time_ms = TORCH_NOT_RUN if r["time_ms"] is None else f"{r['time_ms']:9.2f} ms"
                print(f"{name:12s} {dtype_name:9s} {r['pass']:17s} {r['impl']:22s} {time_ms}", flush=True)
            rows.extend(op_rows)
    device = jax.devices()[0]
    result = dict(
        smoke=args.smoke, device=device.device_kind, platform=device.platform, device_count=jax.device_count(),
        cpu_count=os.cpu_count(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=versions(), command=" ".join(["python -m kernels.bench", *argv]).strip(),
        with_static=not args.no_static, iters=iters, warmup=warmup, repeats=repeats, torch=torch_note, rows=rows,
    )
    return _write(result, "xla_backward", _xla_backward_markdown(result), args.out_dir, args.smoke)


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    """Runs the benchmark; returns the paths of the JSON and markdown files it wrote."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations; interpret mode off GPU")
    parser.add_argument("--out-dir", default="benchmarks", help="where the JSON and markdown results go")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    parser.add_argument("--no-static", action="store_true", help="involution (no static kernel) instead of C-volution")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused span conv + aggregation rows")
    parser.add_argument("--xla-backward", action="store_true", help="time the XLA path (any backend, meant for CPU); see the module docstring")
    parser.add_argument("--involution-code", default=None, help="path to the involution authors' involution_naive.py (with --xla-backward; needs torch)")
    parser.add_argument("--iters", type=int, default=None, help="calls per timing (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; smoke 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timings, the median is kept (default 5; smoke 1)")
    args = parser.parse_args(argv)
    for flag, value, minimum in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0), ("--repeats", args.repeats, 1)):
        if value is not None and value < minimum:
            parser.error(f"{flag} must be >= {minimum}; got {value}.")
    if args.involution_code is not None and not os.path.isfile(args.involution_code):
        parser.error(f"--involution-code {args.involution_code}: no such file; give the path of the involution authors' "
                     f"involution_naive.py (from github.com/d-li14/involution).")
    unknown = [name for name in args.dtypes.split(",") if name not in ("float32", "bfloat16")]
    if unknown:
        parser.error(f"--dtypes {args.dtypes}: the kernels take float32 and bfloat16; got {', '.join(unknown)}.")

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.smoke and not args.xla_backward:
        parser.error(
            f"no GPU (backend {jax.default_backend()!r}): the kernels would run in the interpreter and the "
            f"times would mean nothing. Run on a GPU machine, or pass --smoke to check the benchmark runs."
        )
    problem = common.output_problem(args.out_dir, folder=True)
    if problem:
        parser.error(f"--out-dir {args.out_dir}: {problem}; checked before anything is measured.")
    if args.xla_backward:
        return _main_xla_backward(args, argv, parser)
    ops = _select_ops(args, parser, REDNET50_OPS)
    iters = args.iters or (2 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    repeats = args.repeats or (1 if args.smoke else 5)
    with_static = not args.no_static

    rows, fused_rows = [], []
    for name, op in ops.items():
        for dtype_name in args.dtypes.split(","):
            dtype = jnp.dtype(dtype_name)
            op_rows = run_op(name, op, dtype, with_static=with_static, interpret=not on_gpu, iters=iters, warmup=warmup, repeats=repeats)
            for r in op_rows:
                print(f"{name:16s} {dtype_name:9s} {r['pass']:17s} {r['impl']:7s} {r['time_ms']:9.3f} ms "
                      f"{r['gb_per_s']:7.0f} GB/s {r['pct_of_copy']:5.0f}% of copy", flush=True)
            rows.extend(op_rows)
            if not args.no_fused:
                fused_rows.extend(run_fused(name, op, dtype, with_static=with_static, interpret=not on_gpu, iters=iters, warmup=warmup, repeats=repeats))
                for r in fused_rows[-4:]:
                    print(f"{name:16s} {dtype_name:9s} {r['pass']:17s} {r['impl']:7s} {r['time_ms']:9.3f} ms fused-vs-unfused "
                          f"{r['speedup_vs_unfused']:.2f}x", flush=True)

    device = jax.devices()[0]
    result = dict(
        smoke=args.smoke, device=device.device_kind, platform=device.platform, device_count=jax.device_count(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), versions=versions(),
        command=" ".join(["python -m kernels.bench", *argv]).strip(),
        with_static=with_static, iters=iters, warmup=warmup, repeats=repeats,
        traffic_model="forward |x|+|Hd|+|S|+|out|; forward+backward adds 2|x|+2|Hd|+2|S|+|out|",
        rows=rows, fused_rows=fused_rows,
    )
    return _write(result, "aggregate", _markdown(result), args.out_dir, args.smoke)


if __name__ == "__main__":
    main()
