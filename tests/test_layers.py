"""Layers against closed forms: channel order, the static branch as a depthwise conv, context size."""

import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax.layers import CVolution, Involution, KernelGenerator, avg_pool_ceil


def init(module, x):
    return module.init(jax.random.key(0), x)


@pytest.mark.parametrize("stride", [1, 2])
def test_cvolution_without_branches_is_involution(stride):
    x = jax.random.normal(jax.random.key(1), (2, 9, 10, 32))
    involution = Involution(32, 7, stride)
    cvolution = CVolution(32, 7, stride, context="none", channel_branch=False)
    variables = init(involution, x)
    assert jax.tree.structure(variables) == jax.tree.structure(init(cvolution, x))
    for train in (False, True):
        a = involution.apply(variables, x, train, mutable=["batch_stats"] if train else False)
        b = cvolution.apply(variables, x, train, mutable=["batch_stats"] if train else False)
        np.testing.assert_array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])


@pytest.mark.parametrize("g,kh,kw", [(0, 0, 0), (1, 2, 5), (1, 6, 6), (0, 3, 3)])
def test_generated_channel_order_is_group_major(g, kh, kw):
    """A span bias that is 1 only at channel g*K*K + kh*K + kw (all weights 0) makes group g copy
    the input shifted by tap (kh, kw) and every other group zero: the PyTorch `view(b, G, K*K, h, w)`."""
    k, c = 7, 32
    x = jax.random.normal(jax.random.key(2), (1, 8, 9, c))
    module = Involution(c, k)
    variables = flax.core.unfreeze(init(module, x))
    span = variables["params"]["generator"]["span_conv"]
    span["kernel"] = jnp.zeros_like(span["kernel"])
    span["bias"] = jnp.zeros_like(span["bias"]).at[g * k * k + kh * k + kw].set(1.0)
    out = np.asarray(module.apply(variables, x))
    pad = (k - 1) // 2
    shifted = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))[:, kh : kh + 8, kw : kw + 9]
    expected = np.zeros_like(out)
    expected[..., g * 16 : (g + 1) * 16] = shifted[..., g * 16 : (g + 1) * 16]
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_channel_branch_adds_a_depthwise_convolution(stride):
    """out(S) - out(S=0) is a depthwise KxK conv with weights S, computed here by lax.conv."""
    k, c = 5, 32
    x = jax.random.normal(jax.random.key(3), (2, 11, 10, c))
    module = CVolution(c, k, stride)
    variables = init(module, x)
    static = variables["params"]["static_kernel"]
    zeroed = jax.tree_util.tree_map_with_path(lambda path, v: jnp.zeros_like(v) if "static_kernel" in str(path) else v, variables)
    difference = module.apply(variables, x) - module.apply(zeroed, x)
    pad = (k - 1) // 2
    depthwise = jax.lax.conv_general_dilated(
        x, static.reshape(k, k, 1, c), (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c, precision="highest",
    )
    np.testing.assert_allclose(difference, depthwise, atol=1e-5)


@pytest.mark.parametrize("context,offsets", [("none", [0]), ("dilated3x3", [-2, 0, 2])])
def test_kernel_generator_sees_its_context_window(context, offsets):
    """Perturbing one input pixel changes the generated kernels at the context taps around it only:
    the pixel itself for involution, the 3x3 taps of dilation 2 (a 5x5 window) for C-volution."""
    x = jax.random.normal(jax.random.key(4), (1, 11, 11, 16))
    generator = KernelGenerator(16, 3, context=context)
    variables = init(generator, x)
    base = generator.apply(variables, x)
    changed = np.abs(np.asarray(generator.apply(variables, x.at[0, 5, 5].add(10.0)) - base)).sum(axis=(0, 3, 4)) > 0
    expected = np.zeros((11, 11), bool)
    expected[np.ix_([5 + o for o in offsets], [5 + o for o in offsets])] = True
    np.testing.assert_array_equal(changed, expected)


@pytest.mark.parametrize("h,w,s", [(7, 9, 2), (8, 8, 2), (10, 11, 3), (5, 5, 1)])
def test_avg_pool_ceil_averages_real_pixels(h, w, s):
    x = np.random.default_rng(0).normal(size=(2, h, w, 3))
    out = np.asarray(avg_pool_ceil(jnp.asarray(x), s))
    ho, wo = -(-h // s), -(-w // s)
    assert out.shape == (2, ho, wo, 3)
    for i, j in itertools.product(range(ho), range(wo)):
        np.testing.assert_allclose(out[:, i, j], x[:, s * i : s * i + s, s * j : s * j + s].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_unknown_context_is_rejected():
    with pytest.raises(ValueError, match=r"context must be one of \('none', 'dilated3x3'\); got 'global'"):
        init(KernelGenerator(16, 3, context="global"), jnp.zeros((1, 4, 4, 16)))
