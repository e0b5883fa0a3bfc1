"""`kernels.fused` against the unfused XLA composition: interpret mode on CPU, CUDA lowering, layers.

The truth is `jax.vjp` of `reference.fused_aggregate` (`reference.aggregate(x, v @ W2 + b, S)`)
in float32 at HIGHEST matmul precision, on the same (possibly bf16) input values; the reference
itself is checked against numpy loops and finite differences in `tests/test_ops.py`.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax import ops
from cvolution_jax.layers import CVolution, Involution
from kernels import common, fused, pallas, reference

from tests.conftest import TRITON_CALL, assert_results_close, export_for_cuda, interpret_tests, pallas_grids

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


def check_against_reference(h, w, c, k, s, d, with_static, dtype, b=2, seed=0, reduced=None, kernels=fused_interpret):
    args, cotangent = make_inputs(seed, b, h, w, c, k, s, with_static, dtype, reduced)
    config = dict(kernel_size=k, stride=s, dilation=d)
    out, grads = value_and_vjp(kernels, args, cotangent, **config)
    up = lambda a: None if a is None else a.astype(jnp.float32)
    expected_out, expected_grads = value_and_vjp(reference.fused_aggregate, tuple(map(up, args)), up(cotangent), **config)
    assert_results_close(GRAD_NAMES, (out, *grads), (expected_out, *expected_grads), dtype)


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


test_interpret_matches_reference, test_interpret_matches_reference_all_configs = interpret_tests(
    check_against_reference, CASES_FP32, CASES_BF16
)


@pytest.mark.slow
def test_interpret_matches_reference_wide_generator_and_many_tiles():
    """C=128 (R=32, two 64-channel tiles), Wo=20 > 16 (two column tiles), batch 3 (row blocks)."""
    check_against_reference(20, 20, 128, 3, 1, 1, True, jnp.float32, b=3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_interpret_matches_reference_over_several_contraction_chunks(dtype):
    """R=40: the span dots run over chunks of 16 rows of R (`CONTRACTION`), the third ragged
    (rows 32-39 real, 40-47 masked) and the fourth (48-63, up to Rp=64) all padding."""
    assert fused.fused_tiles(6, 32, 40).contraction == 16 < fused.padded(40) == 64
    check_against_reference(6, 5, 32, 3, 2, 1, True, dtype, b=1, reduced=40)


# Smaller than the heuristics at test sizes, every dimension ragged: C=48 in channel tiles of 32
# (forward, weight grads) and chunks of 16 (dv); W=18 in 16-wide column tiles; dW2 blocks of 3
# rows over B*Ho = 8 (a last block of 2); the dx dot over all of R (contraction 0).
SMALL_TILES = fused.FusedTiles(
    forward=common.Tiles(width=16, channels=32, rows=1, num_warps=2, num_stages=1, contraction=16),
    dx=common.Tiles(width=16, channels=16, rows=1, num_warps=2, num_stages=1, contraction=0),
    dv=common.Tiles(width=16, channels=16, rows=1, num_warps=2, num_stages=1),
    weight_grads=common.Tiles(width=16, channels=32, rows=3, num_warps=2, num_stages=1),
)


def test_interpret_matches_reference_with_explicit_ragged_tiles():
    """Tiles passed through `ops.fused_aggregate(tiles=)`; x [2, 4, 18, 48], K=3, d=2, R=12."""
    kernels = lambda *a, **config: ops.fused_aggregate(*a, **config, impl="pallas", tiles=SMALL_TILES)
    check_against_reference(4, 18, 48, 3, 1, 2, True, jnp.float32, kernels=kernels)
    args, cotangent = make_inputs(0, 2, 4, 18, 48, 3, 1, True, jnp.float32)
    call = lambda *a: fused.fused_aggregate(*a, kernel_size=3, stride=1, dilation=2, tiles=SMALL_TILES, interpret=True)
    # Rows B*Ho = 8 (forward, dv), B*H = 8 (dx), ceil(8 / 3) = 3 blocks; columns ceil(18 / 16) = 2;
    # channels ceil(48 / 32) = 2 and ceil(48 / 16) = 3; dv owns all channels of its pixels.
    assert pallas_grids(lambda *a: jax.vjp(call, *a)[1](cotangent), *args) == {
        "cvolution_fused_forward": (8, 2, 2), "cvolution_fused_dx": (8, 2, 3),
        "cvolution_fused_dv": (8, 2), "cvolution_fused_weight_grads": (3, 2, 2),
    }


@pytest.mark.parametrize("tiles,match", [
    (fused.FusedTiles(forward=common.Tiles(8, 16, 1, 2, 1, 16)), r"tiles\.forward = .* width=8 \(a power of two >= 16\)"),
    (fused.FusedTiles(dx=common.Tiles(16, 16, 1, 2, 1, 32)), r"tiles\.dx has contraction=32; expected 0 \(all of R\) or a power of two from 16 to Rp=16"),
    (pallas.AggregateTiles(), r"tiles is a AggregateTiles; expected kernels\.fused\.FusedTiles or None"),
], ids=["below_dot_minimum", "contraction_past_rp", "unfused_tile_set"])
def test_tiles_the_fused_kernels_cannot_run_are_refused_in_one_line(tiles, match):
    (x, v, w2, bias, static), _ = make_inputs(1, 1, 5, 5, 16, 3, 1, True, jnp.float32, reduced=12)
    with pytest.raises(ValueError, match=match) as error:
        ops.fused_aggregate(x, v, w2, bias, static, kernel_size=3, impl="pallas", tiles=tiles)
    assert "\n" not in str(error.value)


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


def export_fused_for_cuda(size, c, s, dtype, k=7, batch=64, materialise_hd=False):
    """StableHLO of value-and-gradient of the fused layer tail for CUDA; `materialise_hd` writes
    Hd first and aggregates it with the unfused kernels instead (the program fusing avoids)."""
    ho = reference.output_size(size, s)
    shapes = [(batch, size, size, c), (batch, ho, ho, c // 4), (c // 4, c // 16 * k * k), (c // 16 * k * k,), (k * k, c)]
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]

    def loss(x, v, w2, bias, static):
        config = dict(kernel_size=k, stride=s, dilation=1)
        if materialise_hd:
            out = pallas.aggregate(x, reference.dynamic_kernel(v, w2, bias, kernel_size=k).astype(dtype), static, **config)
        else:
            out = fused.fused_aggregate(x, v, w2, bias, static, **config)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return export_for_cuda(jax.value_and_grad(loss, argnums=tuple(range(len(structs)))), structs)


def tensors_of_size(text: str, elements: int) -> list[str]:
    """Every tensor type in the module text that holds `elements` elements, whatever its rank."""
    types = re.findall(r"tensor<((?:\d+x)*)[a-z]\w*>", text)
    return sorted({t for t in types if t and math.prod(int(n) for n in t.rstrip("x").split("x")) == elements})


def hd_elements(size, c, s, k=7, batch=64):
    ho = reference.output_size(size, s)
    return batch * ho * ho * (c // 16) * k * k


def test_the_hd_check_finds_hd_where_it_is_written():
    """`tensors_of_size` sees Hd in the unfused program, in each of the shapes it travels in."""
    size, c, s = REDNET50_STAGES["stage4_c512"]
    found = tensors_of_size(export_fused_for_cuda(size, c, s, jnp.float32, materialise_hd=True), hd_elements(size, c, s))
    # [B, Ho, Wo, G*K*K] from the span conv, [B, Ho, Wo, G, K*K] into the kernels, flat inside them.
    assert {"64x7x7x1568x", "64x7x7x32x49x", "4917248x"} <= set(found), found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", REDNET50_STAGES.values(), ids=REDNET50_STAGES.keys())
def test_lowers_for_cuda(stage, dtype, verified_triton_modules):
    size, c, s = stage
    text = export_fused_for_cuda(size, c, s, dtype)
    # Forward, dx, dv and the dW2/db/dS kernel: four Triton calls, nothing left to autodiff,
    # and no tensor of Hd's size in the module, in any shape.
    assert tensors_of_size(text, hd_elements(size, c, s)) == []
    assert text.count(f"@{TRITON_CALL}(") == 4, text.count(f"@{TRITON_CALL}(")
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
