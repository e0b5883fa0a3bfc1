"""`kernels.fused` against the unfused XLA composition: interpret mode on CPU, CUDA lowering, layers.

The truth is `jax.vjp` of `reference.fused_aggregate` (`reference.aggregate(x, v @ W2 + b, S)`)
in float32 at HIGHEST matmul precision, on the same (possibly bf16) input values; the reference
itself is checked against numpy loops and finite differences in `tests/test_ops.py`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax.layers import CVolution, Involution
from kernels import fused, reference

from tests.test_kernels_pallas import TRITON_CALL, assert_close, verified_triton_modules  # noqa: F401 (fixture)

GRAD_NAMES = ("out", "dx", "dv", "dW2", "db", "dS")


def make_inputs(seed, b, h, w, c, k, s, with_static, dtype, reduced=None):
    """x, v, W2 `[R, G*K*K]`, b, S (or None) and an output cotangent; W2 scaled so Hd ~ N(0, 1)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    ho, wo = reference.output_size(h, s), reference.output_size(w, s)
    r = reduced or c // 4
    span = c // 16 * k * k
    x = jax.random.normal(keys[0], (b, h, w, c), dtype)
    v = jax.random.normal(keys[1], (b, ho, wo, r), dtype)
    w2 = (jax.random.normal(keys[2], (r, span)) / np.sqrt(r)).astype(dtype)
    bias = jax.random.normal(keys[3], (span,), dtype)
    static = jax.random.normal(keys[4], (k * k, c), dtype) if with_static else None
    cotangent = jax.random.normal(keys[5], (b, ho, wo, c), dtype)
    return (x, v, w2, bias, static), cotangent


def fused_interpret(*args, **config):
    return fused.fused_aggregate(*args, **config, interpret=True)


def value_and_vjp(fn, args, cotangent, **config):
    def run(args, cotangent):
        out, vjp = jax.vjp(lambda *a: fn(*a, **config), *args)
        return out, vjp(cotangent)

    with jax.default_matmul_precision("highest"):  # the reference's v @ W2 in true float32
        return jax.jit(run)(args, cotangent)


def check_against_reference(h, w, c, k, s, d, with_static, dtype, b=2, seed=0, reduced=None):
    args, cotangent = make_inputs(seed, b, h, w, c, k, s, with_static, dtype, reduced)
    config = dict(kernel_size=k, stride=s, dilation=d)
    out, grads = value_and_vjp(fused_interpret, args, cotangent, **config)
    up = lambda a: None if a is None else a.astype(jnp.float32)
    expected_out, expected_grads = value_and_vjp(reference.fused_aggregate, tuple(map(up, args)), up(cotangent), **config)
    assert out.dtype == dtype and all(g is None or g.dtype == dtype for g in grads)
    for name, got, expected in zip(GRAD_NAMES, (out, *grads), (expected_out, *expected_grads)):
        if expected is None:
            assert got is None, name
            continue
        assert_close(got, expected, dtype, name)


# (H, W, C, K, stride, dilation, static kernel): every K, stride, dilation; ragged everything.
CASES_FP32 = [
    (5, 7, 16, 3, 1, 1, False),  # R=4: the dots' reduction dim is padded 4 -> 16
    (7, 9, 32, 5, 2, 2, True),
    (6, 5, 48, 7, 1, 2, True),  # C=48: ragged channel tile; 7x7 dilated window larger than the image
    (9, 8, 16, 7, 2, 1, False),
]
CASES_BF16 = [
    (7, 8, 32, 3, 2, 1, True),
    (6, 7, 16, 5, 1, 2, False),
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


@pytest.mark.slow
def test_interpret_matches_reference_wide_generator_and_many_tiles():
    """C=128 (R=32, two 64-channel tiles), Wo=20 > 16 (two column tiles), batch 3 (row blocks)."""
    check_against_reference(20, 20, 128, 3, 1, 1, True, jnp.float32, b=3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_interpret_matches_reference_over_several_contraction_chunks(dtype):
    """R=40: the span dots run over chunks of 16 rows of R (`CONTRACTION`), the third ragged
    (rows 32-39 real, 40-47 masked) and the fourth (48-63, up to Rp=64) all padding."""
    assert fused.fused_tiles(6, 32, 40).contraction == 16 < fused._padded(40) == 64
    check_against_reference(6, 5, 32, 3, 2, 1, True, dtype, b=1, reduced=40)


def test_weight_partials_stay_bounded_on_rednet_shapes():
    """The dW2 partial sums of the largest layer fit the budget, and tiles meet the dot's minimum."""
    for rows, width, channels in [(64 * 56, 56, 64), (64 * 28, 28, 128), (64 * 14, 14, 256), (64 * 7, 7, 512)]:
        reduced, k = channels // 4, 7
        tiles = fused.weight_tiles(rows, width, channels, reduced, k)
        assert tiles.width >= fused.DOT_MIN and tiles.channels >= fused.DOT_MIN
        assert tiles.width & (tiles.width - 1) == 0 and tiles.channels & (tiles.channels - 1) == 0
        parts = -(-rows // tiles.rows) * -(-width // tiles.width)
        assert parts * reduced * channels // 16 * k * k <= fused.WEIGHT_PARTIAL_FLOATS


def test_rejects_mismatched_span_kernel():
    (x, v, w2, bias, static), _ = make_inputs(1, 1, 5, 5, 16, 3, 1, True, jnp.float32)
    with pytest.raises(ValueError, match=r"span_kernel .* must be \[R, G\*K\*K\]"):
        fused.fused_aggregate(x, v, w2[:, :-1], bias, static, kernel_size=3, stride=1, dilation=1, interpret=True)


# --- layers: fuse_generator=True and False on the same parameters -----------------------------


@pytest.mark.parametrize("layer", [
    Involution(16, 3, 1),
    CVolution(32, 3, 2),  # dilated context, static kernel, stride 2
], ids=["involution", "cvolution"])
def test_layer_fused_kernels_equal_unfused(layer):
    x = jax.random.normal(jax.random.key(3), (2, 6, 7, layer.channels))
    unfused_layer = layer.clone(fuse_generator=False, impl="xla")
    fused_layer = layer.clone(fuse_generator=True, impl="pallas")  # the Triton kernels, interpreted on CPU
    variables = fused_layer.init(jax.random.key(0), x)
    # Same parameter tree and values either way: checkpoints are interchangeable.
    other = unfused_layer.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(other)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(other)):
        np.testing.assert_array_equal(a, b)

    def loss(module, params, x):
        out, _ = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
        return jnp.sum(out * jnp.cos(out)), out

    with jax.default_matmul_precision("highest"):
        grads = {}
        for name, module in (("fused", fused_layer), ("unfused", unfused_layer)):
            grads[name] = jax.jit(jax.grad(functools.partial(loss, module), argnums=(0, 1), has_aux=True))(variables["params"], x)
    (g_fused, out_fused), (g_unfused, out_unfused) = grads["fused"], grads["unfused"]
    np.testing.assert_allclose(out_fused, out_unfused, rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fused), jax.tree.leaves(g_unfused)):
        scale = np.abs(np.asarray(b)).max()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


# --- lowering for CUDA on a CPU-only machine --------------------------------------------------

# RedNet/CedNet-50 at 224x224, batch 64: (H, C, stride) of each stage's 7x7 op that differs in shape.
REDNET50_STAGES = {
    "stage1_c64": (56, 64, 1),
    "stage2_c128_s2": (56, 128, 2),
    "stage3_c256_s2": (28, 256, 2),
    "stage4_c512": (7, 512, 1),
}


def export_for_cuda(size, c, s, dtype, k=7, batch=64):
    ho = reference.output_size(size, s)
    shapes = [(batch, size, size, c), (batch, ho, ho, c // 4), (c // 4, c // 16 * k * k), (c // 16 * k * k,), (k * k, c)]
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]

    def loss(*args):
        out = fused.fused_aggregate(*args, kernel_size=k, stride=s, dilation=1)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    fn = jax.value_and_grad(loss, argnums=tuple(range(len(structs))))
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*structs)
    return exported.mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", REDNET50_STAGES.values(), ids=REDNET50_STAGES.keys())
def test_lowers_for_cuda(stage, dtype, verified_triton_modules):
    size, c, s = stage
    text = export_for_cuda(size, c, s, dtype)
    # Forward, dx, dv and the dW2/db/dS kernel: four Triton calls, nothing left to autodiff,
    # and no [B, Ho, Wo, G*K*K] Hd anywhere in the module.
    ho = reference.output_size(size, s)
    assert f"tensor<64x{ho}x{ho}x{c // 16 * 49}x" not in text
    assert text.count(f"@{TRITON_CALL}(") == 4, text.count(f"@{TRITON_CALL}(")
    if verified_triton_modules is not None:
        assert verified_triton_modules == [True] * 4


# --- the reference and the dispatch ----------------------------------------------------------


def test_reference_equals_numpy_span_conv_then_aggregation():
    """`reference.fused_aggregate` against Hd written out by a numpy loop over groups and taps."""
    (x, v, w2, bias, static), _ = make_inputs(7, 2, 6, 5, 32, 3, 2, True, jnp.float32)
    k, groups = 3, 2
    v64, w64, b64 = (np.asarray(a, np.float64) for a in (v, w2, bias))
    hd = np.zeros((*v.shape[:3], groups, k * k))
    for g in range(groups):
        for t in range(k * k):
            hd[..., g, t] = v64 @ w64[:, g * k * k + t] + b64[g * k * k + t]
    config = dict(kernel_size=k, stride=2, dilation=1)
    expected = reference.aggregate(x, jnp.asarray(hd, jnp.float32), static, **config)
    with jax.default_matmul_precision("highest"):
        got = reference.fused_aggregate(x, v, w2.reshape(1, 1, *w2.shape), bias, static, **config)  # flax's 4-D kernel
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_keeps_hd_in_float32_for_bf16_features():
    (x, v, w2, bias, _), _ = make_inputs(8, 1, 4, 4, 16, 3, 1, False, jnp.bfloat16)
    hd = reference.dynamic_kernel(v, w2, bias, kernel_size=3)
    assert hd.dtype == jnp.float32 and hd.shape == (1, 4, 4, 1, 9)
    expected = np.asarray(v, np.float32) @ np.asarray(w2, np.float32) + np.asarray(bias, np.float32)
    np.testing.assert_allclose(np.asarray(hd).reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def _runs_pallas(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("impl,expect_pallas", [("xla", False), ("auto", False), ("pallas", True)])
def test_layer_impl_chooses_for_the_fused_path(impl, expect_pallas):
    """On CPU `auto` and `xla` run the jnp reference for fuse_generator=True, `pallas` the kernels."""
    layer = CVolution(16, 3, 1, fuse_generator=True, impl=impl)
    x = jax.random.normal(jax.random.key(9), (1, 5, 5, 16))
    variables = layer.init(jax.random.key(0), x)
    assert _runs_pallas(lambda v, x: layer.apply(v, x), variables, x) == expect_pallas
    unfused = layer.clone(fuse_generator=False, impl="xla")
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(layer.apply(variables, x), unfused.apply(variables, x), rtol=1e-5, atol=1e-5)
