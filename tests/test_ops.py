"""`cvolution_jax.ops.aggregate` against a plain numpy loop, finite differences and its error messages."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cvolution_jax.ops import aggregate, fused_aggregate
from kernels import common, fused, pallas, reference


def numpy_aggregate(x, dynamic, static, k, s, d):
    """The spec's formula as a loop over (i, j, kh, kw), vectorised over batch and channels.

    Out-of-range taps are skipped instead of read from a padded copy: an independent route to
    the zero padding `d*(K-1)/2`.
    """
    b, h, w, c = x.shape
    ho, wo = -(-h // s), -(-w // s)
    pad = d * (k - 1) // 2
    group = np.arange(c) // 16
    out = np.zeros((b, ho, wo, c), np.float64)
    for i, j, kh, kw in itertools.product(range(ho), range(wo), range(k), range(k)):
        r, q = s * i + kh * d - pad, s * j + kw * d - pad
        if 0 <= r < h and 0 <= q < w:
            weight = dynamic[:, i, j, group, kh * k + kw]  # [B, C]
            if static is not None:
                weight = weight + static[kh * k + kw]
            out[:, i, j] += weight * x[:, r, q]
    return out


def make_inputs(seed, b, h, w, c, k, s, with_static, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    ho, wo = -(-h // s), -(-w // s)
    x = jax.random.normal(keys[0], (b, h, w, c), dtype)
    dynamic = jax.random.normal(keys[1], (b, ho, wo, c // 16, k * k), dtype)
    static = jax.random.normal(keys[2], (k * k, c), dtype) if with_static else None
    return x, dynamic, static


CASES = [
    # (H, W, C, K, stride, dilation): odd and even sizes, K 3 and 7, strides and dilations 1 and 2
    (7, 9, 16, 3, 1, 1),
    (9, 7, 32, 3, 2, 1),
    (8, 11, 16, 3, 1, 2),
    (11, 9, 32, 7, 1, 1),
    (10, 13, 16, 7, 2, 1),
    (9, 9, 16, 7, 2, 2),
    (5, 6, 16, 7, 1, 2),
]


@pytest.mark.parametrize("with_static", [False, True], ids=["involution", "cvolution"])
@pytest.mark.parametrize("h,w,c,k,s,d", CASES)
def test_matches_numpy_loop_fp32(h, w, c, k, s, d, with_static):
    x, dynamic, static = make_inputs(0, 2, h, w, c, k, s, with_static)
    out = aggregate(x, dynamic, static, kernel_size=k, stride=s, dilation=d, impl="xla")
    expected = numpy_aggregate(*(None if a is None else np.asarray(a, np.float64) for a in (x, dynamic, static)), k, s, d)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_static", [False, True], ids=["involution", "cvolution"])
@pytest.mark.parametrize("h,w,c,k,s,d", [CASES[1], CASES[4], CASES[5]])
def test_matches_numpy_loop_bf16(h, w, c, k, s, d, with_static):
    x, dynamic, static = make_inputs(1, 2, h, w, c, k, s, with_static, jnp.bfloat16)
    out = aggregate(x, dynamic, static, kernel_size=k, stride=s, dilation=d)
    assert out.dtype == jnp.bfloat16
    expected = numpy_aggregate(*(None if a is None else np.asarray(a, np.float64) for a in (x, dynamic, static)), k, s, d)
    # 1e-2 relative to the output's scale: single outputs near zero have no relative precision in bf16.
    err = np.abs(np.asarray(out, np.float64) - expected)
    assert err.max() <= 1e-2 * np.abs(expected).max(), err.max()
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).std())


@pytest.mark.parametrize("with_static", [False, True], ids=["involution", "cvolution"])
@pytest.mark.parametrize("h,w,c,k,s,d", [CASES[0], CASES[2], CASES[4], CASES[5]])
def test_gradients_match_finite_differences(h, w, c, k, s, d, with_static):
    with jax.enable_x64(True):
        x, dynamic, static = make_inputs(2, 1, h, w, c, k, s, with_static, jnp.float64)
        if with_static:
            f = lambda x, dyn, st: aggregate(x, dyn, st, kernel_size=k, stride=s, dilation=d)
            args = (x, dynamic, static)
        else:
            f = lambda x, dyn: aggregate(x, dyn, kernel_size=k, stride=s, dilation=d)
            args = (x, dynamic)
        check_grads(f, args, order=1, modes=["rev"], eps=1e-4)


def test_gradients_match_closed_form():
    """The spec's gradient formulas for dHd and dS, as numpy loops, against autodiff (fp32)."""
    b, h, w, c, k, s, d = 2, 9, 8, 32, 3, 2, 2
    x, dynamic, static = make_inputs(3, b, h, w, c, k, s, True)
    cotangent = jax.random.normal(jax.random.key(4), (b, -(-h // s), -(-w // s), c))
    _, vjp = jax.vjp(lambda x, dyn, st: aggregate(x, dyn, st, kernel_size=k, stride=s, dilation=d), x, dynamic, static)
    dx, ddyn, dstatic = vjp(cotangent)
    x64, dyn64, st64, dout = (np.asarray(a, np.float64) for a in (x, dynamic, static, cotangent))
    pad = d * (k - 1) // 2
    ex_dx, ex_ddyn, ex_dst = np.zeros_like(x64), np.zeros_like(dyn64), np.zeros_like(st64)
    group = np.arange(c) // 16
    for i, j, kh, kw in itertools.product(range(dout.shape[1]), range(dout.shape[2]), range(k), range(k)):
        r, q = s * i + kh * d - pad, s * j + kw * d - pad
        if 0 <= r < h and 0 <= q < w:
            prod = dout[:, i, j] * x64[:, r, q]  # [B, C]
            ex_ddyn[:, i, j, :, kh * k + kw] += prod.reshape(b, c // 16, 16).sum(-1)
            ex_dst[kh * k + kw] += prod.sum(0)
            ex_dx[:, r, q] += (dyn64[:, i, j, group, kh * k + kw] + st64[kh * k + kw]) * dout[:, i, j]
    for got, expected in ((dx, ex_dx), (ddyn, ex_ddyn), (dstatic, ex_dst)):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)


def test_static_kernel_gradient_of_a_large_batch_keeps_float32_round_off_small():
    """dS sums B*Ho*Wo = 12544 products per tap. With inputs of non-zero mean, one running float32
    sum over all of them drifts ~4e-6 of the result; the backward sums each image's pixels first,
    then the images (~1e-7). Against a float64 numpy sum of the spec's formula, K=7, stride 1."""
    b, size, c, k = 64, 14, 16, 7
    x = np.asarray(jax.random.normal(jax.random.key(11), (b, size, size, c))) + 0.5
    dout = np.asarray(jax.random.normal(jax.random.key(12), (b, size, size, c))) + 0.5
    dynamic = jnp.zeros((b, size, size, 1, k * k))
    static = jnp.zeros((k * k, c))
    _, vjp = jax.vjp(lambda st: reference.aggregate(x, dynamic, st, kernel_size=k, stride=1, dilation=1), static)
    (dstatic,) = vjp(jnp.asarray(dout))
    pad = (k - 1) // 2
    x_pad = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    expected = np.stack([(x_pad[:, kh : kh + size, kw : kw + size] * dout).sum((0, 1, 2)) for kh in range(k) for kw in range(k)])
    assert np.abs(np.asarray(dstatic, np.float64) - expected).max() <= 5e-7 * np.abs(expected).max()


def test_gradients_of_an_empty_batch_are_empty_and_zero():
    """B=0 (e.g. a last shard with no images): dx and dHd are empty, dS is zeros of its shape, as
    autodiff gives (the image-by-image sum of the previous dS could not start without an image)."""
    x, dynamic, static = make_inputs(13, 0, 7, 6, 32, 3, 2, True)
    _, vjp = jax.vjp(lambda *a: reference.aggregate(*a, kernel_size=3, stride=2, dilation=1), x, dynamic, static)
    dx, ddyn, dstatic = vjp(jnp.zeros((0, 4, 3, 32)))
    assert dx.shape == x.shape and ddyn.shape == dynamic.shape
    np.testing.assert_array_equal(dstatic, np.zeros((9, 32), np.float32))
    _, oracle = jax.vjp(lambda *a: reference.aggregate_autodiff(*a, kernel_size=3, stride=2, dilation=1), x, dynamic, static)
    np.testing.assert_array_equal(oracle(jnp.zeros((0, 4, 3, 32)))[2], dstatic)


def vjp_all(fn, args, cotangent, **config):
    out, vjp = jax.vjp(lambda *a: fn(*a, **config), *args)
    return (out, *vjp(cotangent))


# C-volution's backward holds involution's (dx, dHd) plus dS, so every shape is checked with the
# static kernel and two (strides and dilations 2) without it, the path where dS is None.
ORACLE_CASES = [(*case, True) for case in CASES] + [(*CASES[1], False), (*CASES[5], False)] + [
    (11, 10, 32, 5, 3, 1, True),  # stride 3: three phases of dx per axis
    (6, 7, 16, 1, 2, 1, True),  # K=1: no padding, a single tap
]


@pytest.mark.parametrize("h,w,c,k,s,d,with_static", ORACLE_CASES)
def test_custom_vjp_equals_autodiff_oracle_fp32(h, w, c, k, s, d, with_static):
    """The kernel-free backward against XLA's autodiff of the same forward (`aggregate_autodiff`)."""
    x, dynamic, static = make_inputs(6, 2, h, w, c, k, s, with_static)
    cotangent = jax.random.normal(jax.random.key(7), (2, -(-h // s), -(-w // s), c))
    config = dict(kernel_size=k, stride=s, dilation=d)
    got = jax.jit(functools.partial(vjp_all, reference.aggregate, **config))((x, dynamic, static), cotangent)
    expected = jax.jit(functools.partial(vjp_all, reference.aggregate_autodiff, **config))((x, dynamic, static), cotangent)
    for name, a, b in zip(("out", "dx", "dHd", "dS"), got, expected):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("h,w,c,k,s,d", [CASES[1], CASES[4], CASES[6]])
def test_custom_vjp_equals_autodiff_oracle_bf16(h, w, c, k, s, d):
    """bf16 inputs: both accumulate in float32, so they differ by bf16 rounding of the results only."""
    x, dynamic, static = make_inputs(8, 2, h, w, c, k, s, True, jnp.bfloat16)
    cotangent = jax.random.normal(jax.random.key(9), (2, -(-h // s), -(-w // s), c), jnp.bfloat16)
    config = dict(kernel_size=k, stride=s, dilation=d)
    got = jax.jit(functools.partial(vjp_all, reference.aggregate, **config))((x, dynamic, static), cotangent)
    expected = jax.jit(functools.partial(vjp_all, reference.aggregate_autodiff, **config))((x, dynamic, static), cotangent)
    for name, a, b in zip(("out", "dx", "dHd", "dS"), got, expected):
        assert a.dtype == jnp.bfloat16, name
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max(), name


def test_custom_vjp_gives_the_spec_gradients_on_a_hand_made_case():
    """One pixel of dout at an image corner, stride 2, dilation 2: which inputs receive it, by hand.

    dout is 1 at output (0, 0) of channel 3 only; K=3, s=2, d=2, p=2. Tap (kh, kw) reads
    x[2*kh - 2, 2*kw - 2]: only taps with kh, kw >= 1 fall inside the image (x rows/cols 0 and 2).
    """
    x = jnp.arange(1 * 5 * 5 * 16, dtype=jnp.float32).reshape(1, 5, 5, 16) / 100
    dynamic = jnp.arange(1 * 3 * 3 * 1 * 9, dtype=jnp.float32).reshape(1, 3, 3, 1, 9)
    static = jnp.ones((9, 16)) * 0.5
    dout = jnp.zeros((1, 3, 3, 16)).at[0, 0, 0, 3].set(1.0)
    _, vjp = jax.vjp(lambda *a: reference.aggregate(*a, kernel_size=3, stride=2, dilation=2), x, dynamic, static)
    dx, ddyn, dstatic = vjp(dout)
    expected_dx = np.zeros((1, 5, 5, 16), np.float32)
    expected_ddyn = np.zeros((1, 3, 3, 1, 9), np.float32)
    expected_ds = np.zeros((9, 16), np.float32)
    for kh, kw in itertools.product(range(1, 3), range(1, 3)):
        t, r, q = kh * 3 + kw, 2 * kh - 2, 2 * kw - 2
        expected_dx[0, r, q, 3] = float(dynamic[0, 0, 0, 0, t]) + 0.5
        expected_ddyn[0, 0, 0, 0, t] = float(x[0, r, q, 3])
        expected_ds[t, 3] = float(x[0, r, q, 3])
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-6)
    np.testing.assert_allclose(ddyn, expected_ddyn, rtol=1e-6)
    np.testing.assert_allclose(dstatic, expected_ds, rtol=1e-6)


def test_forward_mode_is_out_of_scope_and_says_so():
    x, dynamic, _ = make_inputs(10, 1, 5, 5, 16, 3, 1, False)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: aggregate(x, dynamic, kernel_size=3, impl="xla"), (x,), (x,))


@pytest.mark.parametrize("fn", ["aggregate", "fused_aggregate"])
def test_auto_runs_the_kernels_exactly_on_gpu_and_matches_the_numpy_loop(fn):
    """Under jit, `impl="auto"` lowers to Pallas calls on a GPU backend and to none elsewhere;
    either way the values are the spec's (here the numpy loop, Hd from the span conv by numpy)."""
    x, _, static = make_inputs(5, 1, 8, 7, 32, 3, 2, True)
    keys = jax.random.split(jax.random.key(14), 3)
    features = jax.random.normal(keys[0], (1, 4, 4, 8))
    span_kernel, span_bias = jax.random.normal(keys[1], (8, 18)) / 3, jax.random.normal(keys[2], (18,))
    hd = np.einsum("bijr,rn->bijn", np.asarray(features, np.float64), np.asarray(span_kernel, np.float64)) + np.asarray(span_bias)
    hd = hd.reshape(1, 4, 4, 2, 9)
    if fn == "aggregate":
        f = jax.jit(lambda x, s: aggregate(x, jnp.asarray(hd, jnp.float32), s, kernel_size=3, stride=2))
    else:
        f = jax.jit(lambda x, s: fused_aggregate(x, features, span_kernel, span_bias, s, kernel_size=3, stride=2))
    assert ("pallas_call" in str(jax.make_jaxpr(f)(x, static))) == (jax.default_backend() == "gpu")
    with jax.default_matmul_precision("highest"):
        got = f(x, static)
    expected = numpy_aggregate(np.asarray(x, np.float64), hd, np.asarray(static, np.float64), 3, 2, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_tiles_are_for_the_pallas_kernels_only(monkeypatch):
    x, dynamic, static = make_inputs(15, 1, 5, 5, 16, 3, 1, True)
    with pytest.raises(ValueError, match=r"aggregate: tiles set the Pallas kernels' tiles, and impl='xla' runs none\. Drop tiles"):
        aggregate(x, dynamic, static, kernel_size=3, impl="xla", tiles=pallas.AggregateTiles())
    with pytest.raises(ValueError, match=r"aggregate: tiles is a FusedTiles; expected kernels\.pallas\.AggregateTiles or None"):
        aggregate(x, dynamic, static, kernel_size=3, tiles=fused.FusedTiles())
    # "auto" picks the reference off GPU and leaves the kernels' tiles unused there.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    tiles = pallas.AggregateTiles(forward=common.Tiles(4, 16, 1, 2, 1))
    f = lambda x, dyn, st: aggregate(x, dyn, st, kernel_size=3, tiles=tiles)
    assert "pallas_call" not in str(jax.make_jaxpr(f)(x, dynamic, static))
    expected = numpy_aggregate(*(np.asarray(a, np.float64) for a in (x, dynamic, static)), 3, 1, 1)
    np.testing.assert_allclose(f(x, dynamic, static), expected, rtol=1e-5, atol=1e-5)


x16 = jnp.zeros((1, 8, 8, 16))
dyn = jnp.zeros((1, 8, 8, 1, 9))


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((jnp.zeros((8, 8, 16)), dyn), dict(kernel_size=3), r"x must be \[B, H, W, C\].*rank 3"),
        ((jnp.zeros((1, 8, 8, 24)), jnp.zeros((1, 8, 8, 1, 9))), dict(kernel_size=3), r"C=24.*multiple of 16"),
        ((x16, jnp.zeros((1, 8, 8, 9))), dict(kernel_size=3), r"dynamic_kernel must be .*rank 4"),
        ((x16, jnp.zeros((2, 8, 8, 1, 9))), dict(kernel_size=3), r"dynamic_kernel has shape \(2, 8, 8, 1, 9\); expected \(1, 8, 8, 1, 9\)"),
        ((x16, dyn), dict(kernel_size=3, stride=2), r"expected \(1, 4, 4, 1, 9\)"),
        ((x16, jnp.zeros((1, 8, 8, 2, 9))), dict(kernel_size=3), r"expected \(1, 8, 8, 1, 9\)"),
        ((x16, jnp.zeros((1, 8, 8, 1, 25))), dict(kernel_size=3), r"expected \(1, 8, 8, 1, 9\)"),
        ((x16, dyn, jnp.zeros((9, 32))), dict(kernel_size=3), r"static_kernel has shape \(9, 32\); expected \(9, 16\)"),
        ((x16, dyn), dict(kernel_size=4), r"kernel_size must be an odd integer.*got 4"),
        ((x16, dyn), dict(kernel_size=3, stride=0), r"stride must be an integer >= 1; got 0"),
        ((x16, dyn), dict(kernel_size=3, dilation=0), r"dilation must be an integer >= 1; got 0"),
        ((x16, dyn), dict(kernel_size=3, impl="cuda"), r"impl must be one of .*'xla'.*got 'cuda'"),
    ],
)
def test_bad_input_raises_clear_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        aggregate(*args, **kwargs)


@pytest.mark.parametrize(
    "args,match",
    [
        (([[[[0.0] * 16] * 8] * 8], dyn), r"aggregate: x is a list; expected a jax or numpy array\. Convert it with jnp\.asarray"),
        ((x16, dyn.tolist()), r"aggregate: dynamic_kernel is a list; expected a jax or numpy array"),
        ((x16.astype(jnp.int32), dyn), r"aggregate: x has dtype int32; expected float32 or bfloat16 .*Cast it"),
        ((x16, dyn.astype(bool)), r"aggregate: dynamic_kernel has dtype bool; expected float32 or bfloat16"),
        ((x16.astype(jnp.complex64), dyn), r"aggregate: x has dtype complex64; expected float32 or bfloat16"),
        ((x16.astype(jnp.float16), dyn), r"aggregate: x has dtype float16; expected float32 or bfloat16"),
        ((x16, dyn, jnp.zeros((9, 16), jnp.float16)), r"aggregate: static_kernel has dtype float16; expected"),
    ],
    ids=["x_list", "dynamic_list", "int32", "bool", "complex64", "float16", "static_float16"],
)
def test_rejects_lists_and_dtypes_it_cannot_compute(args, match):
    with pytest.raises(ValueError, match=match):
        aggregate(*args, kernel_size=3)


def test_float64_runs_on_xla_and_is_refused_by_pallas_with_a_way_out():
    with jax.enable_x64(True):
        x, dynamic, _ = make_inputs(11, 1, 5, 5, 16, 3, 1, False, jnp.float64)
        assert aggregate(x, dynamic, kernel_size=3).dtype == jnp.float64
        with pytest.raises(ValueError, match=r"impl='pallas' cannot take these inputs: x has dtype float64.*Use impl='xla'"):
            aggregate(x, dynamic, kernel_size=3, impl="pallas")


def test_fused_aggregate_xla_equals_aggregate_of_the_span_conv():
    x, _, static = make_inputs(12, 2, 7, 6, 32, 3, 2, True)
    keys = jax.random.split(jax.random.key(13), 3)
    features = jax.random.normal(keys[0], (2, 4, 3, 8))
    span_kernel = jax.random.normal(keys[1], (8, 2 * 9)) / 3
    span_bias = jax.random.normal(keys[2], (18,))
    with jax.default_matmul_precision("highest"):
        got = fused_aggregate(x, features, span_kernel, span_bias, static, kernel_size=3, stride=2, impl="xla")
    hd = np.einsum("bijr,rn->bijn", np.asarray(features, np.float64), np.asarray(span_kernel, np.float64)) + np.asarray(span_bias)
    expected = numpy_aggregate(np.asarray(x, np.float64), hd.reshape(2, 4, 3, 2, 9), np.asarray(static, np.float64), 3, 2, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "features,span_kernel,span_bias,match",
    [
        (jnp.zeros((1, 4, 4, 4)), jnp.zeros((4, 9)), jnp.zeros((9,)), r"features has shape \(1, 4, 4, 4\); expected \[B, Ho, Wo, R\] = \[1, 8, 8, R\]"),
        (jnp.zeros((1, 8, 8, 4)), jnp.zeros((4, 8)), jnp.zeros((9,)), r"span_kernel \(4, 8\) and span_bias \(9,\) must be \[R, G\*K\*K\] = \[4, 9\]"),
        (jnp.zeros((1, 8, 8, 4), jnp.int32), jnp.zeros((4, 9)), jnp.zeros((9,)), r"fused_aggregate: features has dtype int32"),
    ],
    ids=["features_shape", "span_kernel_shape", "features_int"],
)
def test_fused_aggregate_bad_input_raises_clear_error(features, span_kernel, span_bias, match):
    with pytest.raises(ValueError, match=match):
        fused_aggregate(x16, features, span_kernel, span_bias, kernel_size=3)
