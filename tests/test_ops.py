"""`cvolution_jax.ops.aggregate` against a plain numpy loop, finite differences and its error messages."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cvolution_jax.ops import aggregate


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


def test_jit_and_auto_equal_xla():
    x, dynamic, static = make_inputs(5, 1, 8, 8, 16, 3, 1, True)
    f = jax.jit(lambda *a: aggregate(*a, kernel_size=3))
    np.testing.assert_allclose(f(x, dynamic, static), aggregate(x, dynamic, static, kernel_size=3, impl="xla"), rtol=1e-6, atol=1e-6)


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
