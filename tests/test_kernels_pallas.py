"""`kernels.pallas` against the XLA reference: interpret mode on CPU, CUDA lowering, GPU, bench.

The reference (`kernels.reference.aggregate`, its gradients by `jax.vjp`) is itself checked
against numpy loops and finite differences in `tests/test_ops.py`.
"""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax import ops
from kernels import bench, pallas, reference

TRITON_CALL = "__gpu$xla.gpu.triton"


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


def assert_close(got, expected, dtype, name):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    scale = np.abs(expected).max()
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    else:
        # 1e-2 relative to the result's scale: single values near zero have no relative precision in bf16.
        err = np.abs(got - expected).max()
        assert err <= 1e-2 * scale, f"{name}: max error {err} > 1e-2 * {scale}"


def check_against_reference(h, w, c, k, s, d, with_static, dtype, b=2, seed=0):
    x, dynamic, static, cotangent = make_inputs(seed, b, h, w, c, k, s, with_static, dtype)
    config = dict(kernel_size=k, stride=s, dilation=d)
    out, grads = value_and_vjp(pallas_interpret, x, dynamic, static, cotangent, **config)
    # The reference runs in float32 on the same (possibly bf16) values: the truth the kernels'
    # float32 accumulation aims at. (XLA's own bf16 backward rounds dx after every tap.)
    up = lambda a: None if a is None else a.astype(jnp.float32)
    expected_out, expected_grads = value_and_vjp(reference.aggregate, *map(up, (x, dynamic, static, cotangent)), **config)
    assert out.dtype == dtype and all(g is None or g.dtype == dtype for g in grads)
    for name, got, expected in zip(("out", "dx", "dHd", "dS"), (out, *grads), (expected_out, *expected_grads)):
        if expected is None:
            assert got is None, name
            continue
        assert_close(got, expected, dtype, name)


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


@pytest.mark.parametrize("h,w,c,k,s,d,with_static", CASES_FP32)
def test_interpret_matches_reference_fp32(h, w, c, k, s, d, with_static):
    check_against_reference(h, w, c, k, s, d, with_static, jnp.float32)


@pytest.mark.parametrize("h,w,c,k,s,d,with_static", CASES_BF16)
def test_interpret_matches_reference_bf16(h, w, c, k, s, d, with_static):
    check_against_reference(h, w, c, k, s, d, with_static, jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_static", [False, True], ids=["involution", "cvolution"])
@pytest.mark.parametrize("k,s,d", [(k, s, d) for k in (3, 5, 7) for s in (1, 2) for d in (1, 2)])
def test_interpret_matches_reference_all_configs(k, s, d, with_static, dtype):
    check_against_reference(9, 10, 32, k, s, d, with_static, dtype, seed=k + s + d)


def small_tiles(*args, **kwargs):
    return pallas.Tiles(width=4, channels=16, rows=1, num_warps=2, num_stages=1)


def small_weight_tiles(rows, width, channels, *, with_static):
    return pallas.Tiles(width=4, channels=32, rows=3 if with_static else 1, num_warps=2, num_stages=1)


@pytest.mark.parametrize("h,w,c,k,s,d", [(7, 11, 48, 3, 1, 1), (9, 10, 48, 7, 2, 2)])
def test_interpret_matches_reference_with_many_ragged_tiles(monkeypatch, h, w, c, k, s, d):
    """Tiles much smaller than the arrays: several column, channel and row blocks, all ragged.

    The real heuristics give one tile per row at these sizes; here every program meets a
    border: 4-wide column tiles over 11 or 10 columns (6 or 5 outputs), channel tiles of 16 and
    32 over 48 channels, and dS blocks of 3 rows over 2*Ho rows (a last, partial block).
    """
    monkeypatch.setattr(pallas, "elementwise_tiles", small_tiles)
    monkeypatch.setattr(pallas, "weight_grad_tiles", small_weight_tiles)
    check_against_reference(h, w, c, k, s, d, True, jnp.float32)


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
                assert programs <= 2 * pallas.WEIGHT_GRAD_PROGRAMS and (programs >= pallas.WEIGHT_GRAD_PROGRAMS or wt.rows == 1)
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

    def spy(*args, interpret, **config):
        calls.append(interpret)
        return reference.aggregate(*args, **config)

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(pallas, "aggregate", spy)
    with jax.enable_x64(dtype == jnp.float64):
        x, dynamic, static, _ = make_inputs(7, 1, 5, 5, 16, 3, 1, True, dtype)
        ops.aggregate(x, dynamic, static, kernel_size=3)
    assert calls == ([False] if expected_impl == "pallas" else [])


def test_ops_pallas_rejects_unsupported_dtype():
    with jax.enable_x64(True):
        x, dynamic, _, _ = make_inputs(8, 1, 5, 5, 16, 3, 1, False, jnp.float64)
        with pytest.raises(ValueError, match=r"impl='pallas'.*float64.*float32 or bfloat16.*impl='xla'"):
            ops.aggregate(x, dynamic, kernel_size=3, impl="pallas")


# --- lowering for CUDA on a CPU-only machine --------------------------------------------------

def export_for_cuda(op: bench.Op, with_static, dtype):
    """The StableHLO text of value-and-gradient of the aggregation at `op`'s shape, for CUDA."""
    k, s = op.kernel_size, op.stride
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape in op.shapes(with_static)]

    def loss(*args):
        static = args[2] if with_static else None
        out = pallas.aggregate(args[0], args[1], static, kernel_size=k, stride=s, dilation=1)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    fn = jax.value_and_grad(loss, argnums=tuple(range(len(structs))))
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*structs)
    return exported.mlir_module()


@pytest.fixture
def verified_triton_modules(monkeypatch):
    """Runs MLIR's verifier (Triton's op rules included) on every Triton module lowered.

    Export only serialises the modules; XLA compiles them on a GPU. Verifying them here catches
    what Triton's verifiers reject (shapes, types) without one. Hooks a private jax function:
    where it has moved, yields None and the test relies on the export alone.
    """
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:
        yield None
        return
    verified = []
    original = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = original(*args, **kwargs)
        with result.module.context:
            verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    yield verified


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_static", [False, True], ids=["involution", "cvolution"])
@pytest.mark.parametrize("op", bench.REDNET50_OPS.values(), ids=bench.REDNET50_OPS.keys())
def test_lowers_for_cuda(op, with_static, dtype, verified_triton_modules):
    """Every aggregation of RedNet/CedNet-50 at 224x224, batch 64 (`bench.REDNET50_OPS`)."""
    text = export_for_cuda(op, with_static, dtype)
    # Forward, dx and the dHd/dS kernel: three Triton calls, nothing left to autodiff.
    assert text.count(f"@{TRITON_CALL}(") == 3, text.count(f"@{TRITON_CALL}(")
    if verified_triton_modules is not None:
        assert verified_triton_modules == [True] * 3


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
    for name, got, want in zip(("out", "dx", "dHd", "dS"), (first[0], *first[1]), (expected[0], *expected[1])):
        if want is not None:
            assert_close(got, want, dtype, name)


# --- bench ---------------------------------------------------------------------------------


def test_bench_smoke_writes_results(tmp_path):
    paths = bench.main(["--smoke", "--dtypes", "bfloat16", "--out-dir", str(tmp_path)])  # one dtype: compiling dominates
    assert sorted(p.suffix for p in paths) == [".json", ".md"] and all(p.parent == tmp_path for p in paths)
    result = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    assert result["smoke"] is True and result["command"].startswith("python -m kernels.bench")
    assert {"device", "date", "versions"} <= set(result) and result["versions"]["jax"] == jax.__version__
    rows = result["rows"]
    assert {(r["op"], r["dtype"], r["pass"], r["impl"]) for r in rows} >= {
        (op, dtype, p, impl) for op in bench.SMOKE_OPS for dtype in ("bfloat16",)
        for p in ("forward", "forward+backward") for impl in ("pallas", "xla", "copy")
    }
    # The smoke op: x [1, 10, 10, 32] (3200), K=7 s=2 so Hd [1, 5, 5, 2, 49] (2450), S [49, 32]
    # (1568), out [1, 5, 5, 32] (800). Forward x+Hd+S+out = 8018; backward adds
    # out + 2x + 2Hd + 2S = 15236. bf16: 2 bytes each.
    assert list(bench.SMOKE_OPS.values()) == [bench.Op(1, 10, 32, 7, 2)]
    expected_bytes = {"forward": 2 * 8018, "forward+backward": 2 * (8018 + 15236)}
    for r in rows:
        assert r["bytes"] == expected_bytes[r["pass"]], r
        assert r["time_ms"] > 0 and r["gb_per_s"] == pytest.approx(r["bytes"] / (r["time_ms"] * 1e-3) / 1e9)
    assert "| smoke_c32_k7_s2 | 1x10x10x32 | 7 | 2 | bfloat16 | forward | pallas |" in paths[1].read_text()
    # The fused rows: both passes, unfused and fused, ratios taken against the unfused row.
    fused_rows = {(r["pass"], r["impl"]): r for r in result["fused_rows"]}
    assert set(fused_rows) == {(p, impl) for p in ("forward", "forward+backward") for impl in ("unfused", "fused")}
    for p in ("forward", "forward+backward"):
        unfused, fused_row = fused_rows[(p, "unfused")], fused_rows[(p, "fused")]
        assert unfused["speedup_vs_unfused"] == 1.0
        assert fused_row["speedup_vs_unfused"] == pytest.approx(unfused["time_ms"] / fused_row["time_ms"])
        if unfused["temp_bytes"]:
            assert fused_row["temp_vs_unfused"] == pytest.approx(fused_row["temp_bytes"] / unfused["temp_bytes"])
    assert "| smoke_c32_k7_s2 | 1x10x10x32 | 7 | 2 | bfloat16 | forward+backward | fused |" in paths[1].read_text()


def test_bench_xla_backward_smoke_writes_ratios_and_says_when_torch_did_not_run(tmp_path):
    paths = bench.main(["--xla-backward", "--smoke", "--out-dir", str(tmp_path), "--involution-code", str(tmp_path / "missing.py")])
    result = json.loads(paths[0].read_text())
    assert paths[0].name.startswith("xla_backward_") and result["torch"] == bench.TORCH_NOT_RUN
    rows = {(r["pass"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {(p, impl) for p in bench.PASSES for impl in bench.XLA_BACKWARD_IMPLS}
    for impl in ("xla", "xla_autodiff", "depthwise_conv"):
        forward, both = rows["forward", impl], rows["forward+backward", impl]
        assert both["vs_forward"] == pytest.approx(both["time_ms"] / forward["time_ms"])
        assert both["xla_speedup"] == pytest.approx(both["time_ms"] / rows["forward+backward", "xla"]["time_ms"])
    assert rows["forward+backward", "torch_involution_naive"]["time_ms"] is None
    assert f"| torch_involution_naive | {bench.TORCH_NOT_RUN} | n/a | n/a |" in paths[1].read_text()
