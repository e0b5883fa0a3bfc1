"""Layers against closed forms: channel order, the static branch as a depthwise conv, context size."""

import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax.layers import CVolution, Involution, KernelGenerator, SpatialOp, avg_pool_ceil, spatial_op


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


def test_static_init_zeros_starts_cvolution_as_the_same_layer_without_channel_branch():
    """`static_init="zeros"`: S is 0 at init, so the layer's output is that of its dynamic part alone
    (the same generator weights with `channel_branch=False`); the default S has variance 1/(K*K)."""
    k, c = 7, 32
    x = jax.random.normal(jax.random.key(5), (2, 9, 9, c))
    zero_init = CVolution(c, k, static_init="zeros")
    variables = init(zero_init, x)
    assert not np.any(variables["params"]["static_kernel"])
    dynamic_only = {"params": {n: v for n, v in variables["params"].items() if n != "static_kernel"}, "batch_stats": variables["batch_stats"]}
    np.testing.assert_array_equal(zero_init.apply(variables, x), CVolution(c, k, channel_branch=False).apply(dynamic_only, x))
    default_s = init(CVolution(c, k), x)["params"]["static_kernel"]
    assert 0.5 / k**2 < float(jnp.var(default_s)) < 2.0 / k**2


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


def test_involution_is_cvolution_with_both_switches_off():
    """One class: the fields are CVolution's, only the defaults differ; an unnamed layer keeps the
    automatic name `Involution_0` that earlier checkpoints hold."""
    layer = Involution(16, 3, 2)
    assert isinstance(layer, CVolution)
    assert (layer.context, layer.channel_branch) == ("none", False)
    assert [f for f in Involution.__dataclass_fields__] == [f for f in CVolution.__dataclass_fields__]

    class Block(flax.linen.Module):
        @flax.linen.compact
        def __call__(self, x):
            return Involution(16, 3)(x)

    params = jax.eval_shape(Block().init, jax.random.key(0), jnp.zeros((1, 6, 6, 16)))["params"]
    assert list(params) == ["Involution_0"]
    assert sorted(params["Involution_0"]["generator"]) == ["reduce_bn", "reduce_conv", "span_conv"]


@pytest.mark.parametrize("kind, expected", [("conv", 3), ("involution", 7), ("cvolution", 7)])
def test_spatial_op_kernel_size_is_the_networks_choice(kind, expected):
    assert SpatialOp(kind).kernel_size == expected
    assert SpatialOp(kind, kernel_size=5).kernel_size == 5


def test_spatial_op_is_hashable_and_equal_by_value():
    a = SpatialOp.named("cvolution", (("impl", "xla"), ("context", "none")))
    assert a == SpatialOp("cvolution", 7, context="none", impl="xla")
    assert len({a, SpatialOp("cvolution", context="none", impl="xla"), SpatialOp("cvolution")}) == 2


def test_spatial_op_rejects_unknown_kinds_and_switches():
    with pytest.raises(ValueError, match=r"spatial op must be one of \('conv', 'involution', 'cvolution'\); got 'deformable'"):
        SpatialOp("deformable")
    with pytest.raises(ValueError, match=r"Unknown spatial op switch\(es\) contxt in op_kwargs; valid: kernel_size, context, channel_branch, static_init, impl, fuse_generator"):
        SpatialOp.named("cvolution", {"contxt": "none"})
    with pytest.raises(ValueError, match=r"static_init must be one of 'fan_in', 'zeros'; got 'ones'"):
        SpatialOp.named("cvolution", {"static_init": "ones"})


@pytest.mark.parametrize("kernel_size", [4, 0, -3, True, 3.0, "7"])
def test_spatial_op_refuses_a_kernel_size_that_is_no_odd_positive_int(kernel_size):
    with pytest.raises(ValueError, match=r"spatial op kernel_size must be an odd int >= 1 .*got " + repr(kernel_size)):
        SpatialOp("involution", kernel_size)


def test_switches_change_only_the_fields_they_name():
    op = SpatialOp("cvolution", 5, impl="xla")
    assert op.with_switches({"context": "none"}) == SpatialOp("cvolution", 5, context="none", impl="xla")
    assert op.with_switches((("kernel_size", 3),)) == SpatialOp("cvolution", 3, impl="xla")
    assert op.with_switches(()) == op
    assert SpatialOp.named("conv", {"kernel_size": 1}) == SpatialOp("conv", 1)


@pytest.mark.parametrize("op, params", [
    (SpatialOp("conv"), {"kernel": (3, 3, 16, 16)}),
    (SpatialOp("conv", kernel_size=1), {"kernel": (1, 1, 16, 16)}),
    (SpatialOp("involution"), {"generator": {"reduce_conv": {"kernel": (1, 1, 16, 4)}, "span_conv": {"kernel": (1, 1, 4, 49), "bias": (49,)}}}),
    (SpatialOp("cvolution", 3, channel_branch=False), {"generator": {"reduce_conv": {"kernel": (1, 1, 16, 4)},
                                                                     "context_conv": {"kernel": (3, 3, 4, 4)},
                                                                     "span_conv": {"kernel": (1, 1, 4, 9), "bias": (9,)}}}),
    (SpatialOp("cvolution", 3), {"static_kernel": (9, 16)}),
])
def test_spatial_op_builds_the_layer_it_names(op, params):
    """Shapes of the parameters each op creates on 16 channels; BatchNorm parameters left out."""

    class Net(flax.linen.Module):
        @flax.linen.compact
        def __call__(self, x):
            return spatial_op(op, 16, name="op")(x, False)

    got = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((1, 8, 8, 16)))["params"]["op"]

    def subset(want, have):
        return {k: subset(v, have[k]) if isinstance(v, dict) else have[k].shape for k, v in want.items()}

    assert subset(params, got) == params
    if isinstance(op, SpatialOp) and op.kind == "cvolution" and not op.channel_branch:
        assert "static_kernel" not in got
