"""`kernels.pallas` against the XLA reference: interpret mode on CPU, CUDA lowering, GPU, bench.

The reference (`kernels.reference.aggregate`, its gradients by `jax.vjp`) is itself checked
against numpy loops and finite differences in `tests/test_ops.py`.
"""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax import ops
from kernels import bench, common, pallas, reference

from tests.conftest import TRITON_CALL, assert_results_close, export_for_cuda, interpret_tests, pallas_grids

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ("out", "dx", "dHd", "dS")


def make_inputs(seed, b, h, w, c, k, s, with_static, dtype):
    """x, Hd, S (or None) and an output cotangent, all normal(0, 1) in `dtype`."""
    keys = jax.random.split(jax.random.key(seed), 4)
    ho, wo = reference.output_size(h, s), reference.output_size(w, s)
    x = jax.random.normal(keys[0], (b, h, w, c), dtype)
    dynamic = jax.random.normal(keys[1], (b, ho, wo, c // 16, k * k), dtype)
    static = jax.random.normal(keys[2], (k * k, c), dtype) if with_static else None
    cotangent = jax.random.normal(keys[3], (b, ho, wo, c), dtype)
    return x, dynamic, static, cotangent


def value_and_vjp(fn, x, dynamic, static, cotangent, **config):
    """`(out, (dx, dHd, dS))` of `fn`; dS is None without a static kernel."""

    def run(x, dynamic, static, cotangent):
        out, vjp = jax.vjp(lambda *a: fn(*a, **config), x, dynamic, static)
        return out, vjp(cotangent)

    return jax.jit(run)(x, dynamic, static, cotangent)


def pallas_interpret(*args, **config):
    return pallas.aggregate(*args, **config, interpret=True)


def check_against_reference(h, w, c, k, s, d, with_static, dtype, b=2, seed=0, kernels=pallas_interpret):
    x, dynamic, static, cotangent = make_inputs(seed, b, h, w, c, k, s, with_static, dtype)
    config = dict(kernel_size=k, stride=s, dilation=d)
    out, grads = value_and_vjp(kernels, x, dynamic, static, cotangent, **config)
    # The reference runs in float32 on the same (possibly bf16) values: the truth the kernels'
    # float32 accumulation aims at. (XLA's own bf16 backward rounds dx after every tap.)
    up = lambda a: None if a is None else a.astype(jnp.float32)
    expected_out, expected_grads = value_and_vjp(reference.aggregate, *map(up, (x, dynamic, static, cotangent)), **config)
    assert_results_close(NAMES, (out, *grads), (expected_out, *expected_grads), dtype)


# (H, W, C, K, stride, dilation, static kernel): odd and even sizes, every K, stride and dilation.
CASES_FP32 = [
    (5, 7, 16, 3, 1, 1, False),
    (7, 9, 32, 3, 2, 1, True),
    (9, 8, 48, 5, 1, 2, True),  # C=48: the channel tile (64) is ragged
    (8, 10, 16, 5, 2, 1, False),
    (11, 6, 16, 7, 1, 1, True),
    (9, 11, 16, 7, 2, 2, False),
    (6, 5, 32, 7, 1, 2, False),  # the 7x7 window (13 wide dilated) is larger than the image
    (10, 7, 16, 3, 2, 2, True),
]
CASES_BF16 = [
    (7, 8, 32, 3, 1, 1, True),
    (9, 7, 16, 7, 2, 1, True),
    (8, 9, 16, 5, 1, 2, False),
]


test_interpret_matches_reference, test_interpret_matches_reference_all_configs = interpret_tests(
    check_against_reference, CASES_FP32, CASES_BF16
)


# Much smaller than the heuristics choose at test sizes (one tile per row there).
SMALL_TILES = pallas.AggregateTiles(
    forward=common.Tiles(width=4, channels=16, rows=1, num_warps=2, num_stages=1),
    dx=common.Tiles(width=4, channels=16, rows=1, num_warps=2, num_stages=1),
    weight_grads=common.Tiles(width=4, channels=32, rows=3, num_warps=2, num_stages=1),
)


@pytest.mark.parametrize("h,w,c,k,s,d", [(7, 11, 48, 3, 1, 1), (9, 10, 48, 7, 2, 2)])
def test_interpret_matches_reference_with_many_ragged_tiles(h, w, c, k, s, d):
    """Tiles passed through `ops.aggregate(tiles=)`: several column, channel and row blocks, all ragged.

    Every program meets a border: 4-wide column tiles over 11 or 10 columns (6 or 5 outputs),
    channel tiles of 16 and 32 over 48 channels, and dS blocks of 3 rows over 2*Ho rows (a last,
    partial block).
    """
    kernels = lambda *a, **config: ops.aggregate(*a, **config, impl="pallas", tiles=SMALL_TILES)
    check_against_reference(h, w, c, k, s, d, True, jnp.float32, kernels=kernels)


def test_explicit_tiles_set_every_kernels_grid():
    """The grids follow the tiles given, a None field the heuristic: by hand for x [2, 9, 10, 48],
    K=7, s=2 (Ho=5, Wo=5)."""
    x, dynamic, static, cotangent = make_inputs(0, 2, 9, 10, 48, 7, 2, True, jnp.float32)

    def grids(tiles):
        kernels = lambda *a: pallas.aggregate(*a, kernel_size=7, stride=2, dilation=1, tiles=tiles, interpret=True)
        return pallas_grids(lambda *a: jax.vjp(kernels, *a)[1](cotangent), x, dynamic, static)

    # Rows: forward B*Ho = 10, dx B*H = 18, dS blocks ceil(10 / 3) = 4. Columns: ceil(5 / 4) = 2,
    # dx ceil(10 / 4) = 3. Channels: ceil(48 / 16) = 3, weight grads ceil(48 / 32) = 2.
    assert grids(SMALL_TILES) == {"cvolution_forward": (10, 2, 3), "cvolution_dx": (18, 3, 3), "cvolution_weight_grads": (4, 2, 2)}
    # Only dx given: the heuristics' one tile per row elsewhere (Wo=5 -> TW=8, C=48 -> TC=64).
    only_dx = grids(pallas.AggregateTiles(dx=SMALL_TILES.dx))
    assert only_dx["cvolution_dx"] == (18, 3, 3) and only_dx["cvolution_forward"] == (10, 1, 1)


@pytest.mark.parametrize("tiles,match", [
    (pallas.AggregateTiles(forward=common.Tiles(6, 16, 1, 2, 1)), r"tiles\.forward = .* cannot run: width=6 \(a power of two >= 1\)"),
    (pallas.AggregateTiles(dx=common.Tiles(4, 8, 1, 2, 1)), r"tiles\.dx = .* channels=8 \(a power of two >= 16"),
    (pallas.AggregateTiles(weight_grads=common.Tiles(4, 16, 0, 3, 1)), r"rows=0 \(>= 1\); num_warps=3"),
    (pallas.AggregateTiles(forward=(4, 16, 1, 2, 1)), r"tiles\.forward is a tuple; expected kernels\.common\.Tiles or None"),
    (common.Tiles(4, 16, 1, 2, 1), r"tiles is a Tiles; expected kernels\.pallas\.AggregateTiles or None"),
], ids=["width", "channels", "rows_and_warps", "plain_tuple", "not_a_tile_set"])
def test_tiles_the_kernels_cannot_run_are_refused_in_one_line(tiles, match):
    x, dynamic, static, _ = make_inputs(0, 1, 5, 5, 16, 3, 1, True, jnp.float32)
    with pytest.raises(ValueError, match=match) as error:
        ops.aggregate(x, dynamic, static, kernel_size=3, impl="pallas", tiles=tiles)
    assert "\n" not in str(error.value)


def test_tile_heuristics_on_rednet_shapes():
    """Powers of two, channel tiles of whole groups, and the choices the docstrings promise."""
    expected = {  # (Wo, C) -> (TW, TC) of the forward
        (112, 32): (64, 32), (56, 64): (32, 64), (28, 128): (16, 128), (14, 256): (8, 256), (7, 512): (8, 256),
    }
    for (width, channels), tiles in expected.items():
        assert pallas.elementwise_tiles(width, channels)[:2] == tiles
    for width, channels, rows in [(112, 32, 64 * 112), (56, 64, 64 * 56), (7, 512, 64 * 7), (9, 48, 2 * 9)]:
        for with_static in (False, True):
            for tiles in (pallas.elementwise_tiles(width, channels), pallas.weight_grad_tiles(rows, width, channels, with_static=with_static)):
                assert tiles.width & (tiles.width - 1) == 0 and tiles.channels & (tiles.channels - 1) == 0
                assert tiles.channels % 16 == 0 and 1 <= tiles.num_warps <= 8
            wt = pallas.weight_grad_tiles(rows, width, channels, with_static=with_static)
            programs = -(-rows // wt.rows) * -(-width // wt.width) * -(-channels // wt.channels)
            if with_static:  # enough programs to fill a GPU, few enough partial sums of dS
                assert programs <= 2 * common.WEIGHT_GRAD_PROGRAMS and (programs >= common.WEIGHT_GRAD_PROGRAMS or wt.rows == 1)
            else:
                assert wt.rows == 1


# --- dispatch through cvolution_jax.ops -------------------------------------------------------


def test_ops_pallas_off_gpu_runs_interpret_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_interpret_logged", False)
    x, dynamic, static, _ = make_inputs(6, 1, 6, 7, 16, 3, 1, True, jnp.float32)
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.ops"):
        got = ops.aggregate(x, dynamic, static, kernel_size=3, impl="pallas")
        ops.aggregate(x, dynamic, static, kernel_size=3, impl="pallas")
    assert sum("interpret mode" in r.getMessage() for r in caplog.records) == 1
    expected = reference.aggregate(x, dynamic, static, kernel_size=3, stride=1, dilation=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,dtype,expected_impl", [
    ("cpu", jnp.float32, "xla"),
    ("gpu", jnp.float32, "pallas"),
    ("gpu", jnp.bfloat16, "pallas"),
    ("gpu", jnp.float64, "xla"),  # the kernels take float32/bfloat16 only
])
def test_ops_auto_dispatch(monkeypatch, backend, dtype, expected_impl):
    calls = []

    def spy(*args, interpret, tiles, **config):
        calls.append((interpret, tiles))
        return reference.aggregate(*args, **config)

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(pallas, "aggregate", spy)
    with jax.enable_x64(dtype == jnp.float64):
        x, dynamic, static, _ = make_inputs(7, 1, 5, 5, 16, 3, 1, True, dtype)
        ops.aggregate(x, dynamic, static, kernel_size=3)
    assert calls == ([(False, None)] if expected_impl == "pallas" else [])


def test_ops_pallas_rejects_unsupported_dtype():
    with jax.enable_x64(True):
        x, dynamic, _, _ = make_inputs(8, 1, 5, 5, 16, 3, 1, False, jnp.float64)
        with pytest.raises(ValueError, match=r"impl='pallas'.*float64.*float32 or bfloat16.*impl='xla'"):
            ops.aggregate(x, dynamic, kernel_size=3, impl="pallas")


# --- lowering for CUDA on a CPU-only machine --------------------------------------------------


def export_aggregate_for_cuda(op: bench.Op, with_static, dtype):
    """The StableHLO text of value-and-gradient of the aggregation at `op`'s shape, for CUDA."""
    k, s = op.kernel_size, op.stride
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape in op.shapes(with_static)]

    def loss(*args):
        static = args[2] if with_static else None
        out = pallas.aggregate(args[0], args[1], static, kernel_size=k, stride=s, dilation=1)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return export_for_cuda(jax.value_and_grad(loss, argnums=tuple(range(len(structs)))), structs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_static", [False, True], ids=["involution", "cvolution"])
@pytest.mark.parametrize("op", bench.REDNET50_OPS.values(), ids=bench.REDNET50_OPS.keys())
def test_lowers_for_cuda(op, with_static, dtype, verified_triton_modules):
    """Every aggregation of RedNet/CedNet-50 at 224x224, batch 64 (`bench.REDNET50_OPS`)."""
    text = export_aggregate_for_cuda(op, with_static, dtype)
    # Forward, dx and the dHd/dS kernel: three Triton calls, nothing left to autodiff.
    assert text.count(f"@{TRITON_CALL}(") == 3, text.count(f"@{TRITON_CALL}(")
    assert verified_triton_modules == [True] * 3


LOWER_TWICE = """
import jax, jax.numpy as jnp
from kernels import bench
from tests.test_kernels_pallas import export_aggregate_for_cuda
for dtype in (jnp.float32, jnp.bfloat16):  # two programs, six kernels lowered
    export_aggregate_for_cuda(bench.SMOKE_OPS["smoke_c32_k7_s2"], True, dtype)
print("lowered")
"""


def test_triton_deprecation_is_shown_once_per_process():
    """jax >= 0.11 warns at every Pallas Triton lowering (DeprecationWarning `jax-pallas-triton`);
    Python's default filters would hide it (it comes from jax's module), and without `kernels.common`'s
    filter a user who shows it would see it at every kernel. Once per process, as a user sees it."""
    proc = subprocess.run([sys.executable, "-c", LOWER_TWICE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "lowered" in proc.stdout, proc.stderr[-3000:]
    deprecated = jax.__version_info__ >= (0, 11)
    assert proc.stderr.count(common.TRITON_DEPRECATION) == (1 if deprecated else 0), proc.stderr[-3000:]


# --- on a GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason=f"needs a GPU backend; this one is {jax.default_backend()!r}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,w,c,k,s,d,with_static", [
    *CASES_FP32,
    (28, 28, 128, 7, 2, 1, True),  # RedNet stage-2 transition at batch 2
    (7, 7, 512, 7, 1, 1, True),  # stage 4: two channel tiles
    (112, 112, 32, 3, 1, 1, True),  # stem: two column tiles
])
def test_compiled_kernels_match_reference_on_gpu(h, w, c, k, s, d, with_static, dtype):
    x, dynamic, static, cotangent = make_inputs(9, 2, h, w, c, k, s, with_static, dtype)
    config = dict(kernel_size=k, stride=s, dilation=d)
    first = value_and_vjp(pallas.aggregate, x, dynamic, static, cotangent, **config)
    again = value_and_vjp(pallas.aggregate, x, dynamic, static, cotangent, **config)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):  # no atomics: bitwise repeatable
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    up = lambda a: None if a is None else a.astype(jnp.float32)
    expected = value_and_vjp(reference.aggregate, *map(up, (x, dynamic, static, cotangent)), **config)
    assert_results_close(NAMES, (first[0], *first[1]), (expected[0], *expected[1]), dtype)


# --- bench ---------------------------------------------------------------------------------


def markdown_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the table that follows the line starting `header`, up to the next blank line."""
    lines = text.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(header)) + 2  # skip the |---| line
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def test_bench_smoke_writes_results(tmp_path):
    paths = bench.main(["--smoke", "--dtypes", "bfloat16", "--out-dir", str(tmp_path)])  # one dtype: compiling dominates
    assert sorted(p.suffix for p in paths) == [".json", ".md"] and all(p.parent == tmp_path for p in paths)
    result = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    markdown = next(p for p in paths if p.suffix == ".md").read_text()
    assert result["smoke"] is True and result["command"].startswith("python -m kernels.bench")
    assert {"device", "date", "versions"} <= set(result) and result["versions"]["jax"] == jax.__version__
    # The smoke op: x [1, 10, 10, 32] (3200), K=7 s=2 so Hd [1, 5, 5, 2, 49] (2450), S [49, 32]
    # (1568), out [1, 5, 5, 32] (800). Forward x+Hd+S+out = 8018; backward adds
    # out + 2x + 2Hd + 2S = 15236. bf16: 2 bytes each.
    assert list(bench.SMOKE_OPS.items()) == [("smoke_c32_k7_s2", bench.Op(1, 10, 32, 7, 2))]
    shape = dict(batch=1, size=10, channels=32, kernel_size=7, stride=2, out_size=5)
    expected_bytes = {"forward": 2 * 8018, "forward+backward": 2 * (8018 + 15236)}
    rows = result["rows"]
    assert sorted((r["pass"], r["impl"]) for r in rows) == sorted(
        (p, impl) for p in ("forward", "forward+backward") for impl in ("pallas", "xla", "copy"))
    for r in rows:
        assert (r["op"], r["dtype"], r["shape"]) == ("smoke_c32_k7_s2", "bfloat16", shape), r
        assert r["bytes"] == expected_bytes[r["pass"]] and r["time_ms"] > 0, r
    # The markdown is the JSON: one line per row, in order, with its time.
    table = markdown_rows(markdown, "| op | x shape |")
    assert [cells[:8] for cells in table] == [
        ["smoke_c32_k7_s2", "1x10x10x32", "7", "2", "bfloat16", r["pass"], r["impl"], f"{r['time_ms']:.3f}"] for r in rows
    ]
    # The fused rows: both passes, unfused and fused, their times and temporaries in the markdown.
    fused_rows = result["fused_rows"]
    assert sorted((r["pass"], r["impl"]) for r in fused_rows) == sorted(
        (p, impl) for p in ("forward", "forward+backward") for impl in ("unfused", "fused"))
    assert all(r["time_ms"] > 0 and (r["temp_bytes"] is None or r["temp_bytes"] >= 0) for r in fused_rows)
    fused_table = markdown_rows(markdown, "| op | x shape | K | s | dtype | pass | impl | time (ms) | temp memory")
    temp = lambda r: "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
    assert [cells[:9] for cells in fused_table] == [
        ["smoke_c32_k7_s2", "1x10x10x32", "7", "2", "bfloat16", r["pass"], r["impl"], f"{r['time_ms']:.3f}", temp(r)]
        for r in fused_rows
    ]


def test_bench_xla_backward_smoke_covers_every_impl_and_says_when_torch_did_not_run(tmp_path):
    paths = bench.main(["--xla-backward", "--smoke", "--out-dir", str(tmp_path)])  # no --involution-code: torch not run
    result = json.loads(paths[0].read_text())
    assert paths[0].name.startswith("xla_backward_") and paths[0].name.endswith("_smoke.json")
    assert result["torch"] == bench.TORCH_NOT_RUN
    rows = result["rows"]
    assert [(r["op"], r["pass"], r["impl"]) for r in rows] == [
        ("smoke_c32_k7_s2", p, impl) for p in ("forward", "forward+backward")
        for impl in ("xla", "xla_autodiff", "depthwise_conv", "torch_involution_naive")
    ]
    for r in rows:
        ran = r["impl"] != "torch_involution_naive"
        assert (r["time_ms"] is not None and r["time_ms"] > 0) if ran else r["time_ms"] is None, r
    table = markdown_rows(paths[1].read_text(), "| op | x shape |")
    assert [cells[:8] for cells in table] == [
        ["smoke_c32_k7_s2", "1x10x10x32", "7", "2", "float32", r["pass"], r["impl"],
         bench.TORCH_NOT_RUN if r["time_ms"] is None else f"{r['time_ms']:.2f}"]
        for r in rows
    ]
