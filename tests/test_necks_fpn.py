"""FPN: nearest upsampling by PyTorch's rule, level shapes, P6, and the neck op switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax.necks.fpn import FPN, upsample_nearest
from cvolution_jax.layers import SpatialOp


def test_upsample_nearest_is_pytorchs_floor_rule():
    x = np.arange(2 * 3 * 5 * 1, dtype=np.float32).reshape(2, 3, 5, 1)
    out = np.asarray(upsample_nearest(jnp.asarray(x), (5, 9)))
    expected = np.empty((2, 5, 9, 1), np.float32)
    for i in range(5):
        for j in range(9):
            # torch.nn.functional.interpolate(mode="nearest"): src = floor(dst * in / out)
            expected[:, i, j] = x[:, int(np.floor(i * 3 / 5)), int(np.floor(j * 5 / 9))]
    np.testing.assert_array_equal(out, expected)


def stages(height, width, channels=(8, 16, 32, 64)):
    keys = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(k, (2, -(-height // s), -(-width // s), c))
            for k, s, c in zip(keys, (4, 8, 16, 32), channels)]


@pytest.mark.parametrize("op", ["conv", "involution", "cvolution"])
def test_levels_shapes_and_p6(op):
    c = stages(100, 72)  # odd level sizes: 25x18, 13x9, 7x5, 4x3
    fpn = FPN(channels=16, op=SpatialOp(op, impl="xla"))
    variables = fpn.init(jax.random.key(1), c)
    outs = fpn.apply(variables, c)
    assert [o.shape for o in outs] == [(2, 25, 18, 16), (2, 13, 9, 16), (2, 7, 5, 16), (2, 4, 3, 16), (2, 2, 2, 16)]
    np.testing.assert_array_equal(np.asarray(outs[4]), np.asarray(outs[3])[:, ::2, ::2])


def test_top_down_pathway_with_identity_weights():
    """With identity laterals and an identity 3x3 output, P_l = C_l + upsampled P_(l+1)."""
    c = stages(64, 64, channels=(4, 4, 4, 4))
    fpn = FPN(channels=4)
    params = jax.tree.map(jnp.zeros_like, fpn.init(jax.random.key(0), c)["params"])
    eye = jnp.eye(4)
    centre = jnp.zeros((3, 3, 4, 4)).at[1, 1].set(eye)
    for i in range(4):
        params[f"lateral{i}"]["kernel"] = eye[None, None]
        params[f"output{i}"]["kernel"] = centre
    outs = fpn.apply({"params": params}, c)
    expected = [np.asarray(x) for x in c]
    for i in (2, 1, 0):
        expected[i] = expected[i] + np.repeat(np.repeat(expected[i + 1], 2, 1), 2, 2)
    for got, want in zip(outs[:4], expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_unknown_op_is_rejected_and_a_kind_alone_is_not_an_op():
    with pytest.raises(ValueError, match="op must be one of"):
        SpatialOp("deformable")
    with pytest.raises(TypeError, match=r"op must be a cvolution_jax.layers.SpatialOp, e.g. SpatialOp\('cvolution'\)"):
        jax.eval_shape(FPN(op="cvolution").init, jax.random.key(0), stages(32, 32))


@pytest.mark.parametrize("op, taps", [(SpatialOp("conv"), 9), (SpatialOp("involution"), 49), (SpatialOp("cvolution"), 49),
                                      (SpatialOp("cvolution", 5), 25)])
def test_output_op_is_a_3x3_conv_or_a_7x7_involution(op, taps):
    """mmdet's 3x3 output convolutions; the paper's neck variants use K=7 unless the op says otherwise."""
    params = jax.eval_shape(FPN(channels=16, op=op).init, jax.random.key(0), stages(32, 32))["params"]
    for i in range(4):
        out = params[f"output{i}"]
        if op.kind == "conv":
            assert out["kernel"].shape == (3, 3, 16, 16) and out["bias"].shape == (16,)
        else:
            assert out["generator"]["span_conv"]["kernel"].shape == (1, 1, 4, taps)
