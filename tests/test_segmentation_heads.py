"""The segmentation heads and EncoderDecoder against numpy transcriptions of the PyTorch ops they
mirror (AdaptiveAvgPool2d, bilinear interpolate with align_corners=False, cross-entropy with an
ignore index) and against closed-form parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax import models
from cvolution_jax.necks.fpn import FPN
from cvolution_jax.layers import SpatialOp
from cvolution_jax.segmentation import heads
from cvolution_jax.segmentation.encoder_decoder import EncoderDecoder, cross_entropy, init_variables


def test_adaptive_avg_pool_bins_like_torch_with_overlapping_uneven_bins():
    x = np.random.default_rng(0).normal(size=(2, 7, 5, 3)).astype(np.float32)
    for bins in (1, 2, 3, 6):
        got = np.asarray(heads.adaptive_avg_pool(jnp.asarray(x), bins))
        want = np.zeros((2, bins, bins, 3), np.float32)
        for i in range(bins):
            r0, r1 = int(np.floor(i * 7 / bins)), int(np.ceil((i + 1) * 7 / bins))
            for j in range(bins):
                c0, c1 = int(np.floor(j * 5 / bins)), int(np.ceil((j + 1) * 5 / bins))
                want[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"bins {bins}")


def torch_bilinear(x, size):
    """`F.interpolate(mode="bilinear", align_corners=False)`, one sample at a time."""
    height, width = x.shape[1:3]
    out = np.zeros((x.shape[0], *size, x.shape[-1]))
    for i in range(size[0]):
        for j in range(size[1]):
            y = max((i + 0.5) * height / size[0] - 0.5, 0.0)
            z = max((j + 0.5) * width / size[1] - 0.5, 0.0)
            y0, z0 = min(int(y), height - 1), min(int(z), width - 1)
            y1, z1 = min(y0 + 1, height - 1), min(z0 + 1, width - 1)
            dy, dz = y - y0, z - z0
            out[:, i, j] = ((1 - dy) * (1 - dz) * x[:, y0, z0] + (1 - dy) * dz * x[:, y0, z1]
                            + dy * (1 - dz) * x[:, y1, z0] + dy * dz * x[:, y1, z1])
    return out


@pytest.mark.parametrize("size", [(7, 10), (3, 2), (6, 4)], ids=["up", "down", "same-rows"])
def test_resize_bilinear_is_torchs_align_corners_false(size):
    x = np.random.default_rng(1).normal(size=(1, 6, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(heads.resize_bilinear(jnp.asarray(x), size)), torch_bilinear(x, size),
                               rtol=1e-5, atol=1e-5)


def test_cross_entropy_averages_over_all_pixels_with_ignored_ones_as_zero():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 3, 4)).astype(np.int32)
    labels[0, 0, :3] = 255
    total = 0.0
    for index in np.ndindex(labels.shape):
        if labels[index] != 255:
            z = logits[index].astype(np.float64)
            total += np.log(np.exp(z).sum()) - z[labels[index]]
    assert float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(total / labels.size, rel=1e-5)


def conv_module_params(cin, cout, k):
    return k * k * cin * cout + 2 * cout  # no bias, BatchNorm scale and offset


def test_fpn_head_has_mmsegs_branches_and_sums_at_the_finest_level():
    head = heads.FPNHead(num_classes=3, channels=8)
    levels = [jnp.ones((1, 32 // s, 64 // s, 16)) for s in (4, 8, 16, 32)]
    variables = head.init(jax.random.key(0), levels)
    names = sorted(variables["params"])
    # Strides 4, 8, 16, 32: 1, 1, 2, 3 ConvModules (max(1, log2(s / 4))).
    assert names == ["cls_seg", "scale_heads_0_0", "scale_heads_1_0", "scale_heads_2_0", "scale_heads_2_1",
                     "scale_heads_3_0", "scale_heads_3_1", "scale_heads_3_2"]
    params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert params == 4 * conv_module_params(16, 8, 3) + 3 * conv_module_params(8, 8, 3) + 8 * 3 + 3
    assert head.apply(variables, levels).shape == (1, 8, 16, 3)


def test_uper_head_and_fcn_head_parameter_counts_are_mmsegs():
    stages = [jnp.ones((1, 64 // s, 64 // s, c)) for s, c in zip((4, 8, 16, 32), (16, 32, 64, 128))]
    uper = heads.UPerHead(num_classes=5, channels=16)
    variables = uper.init(jax.random.key(0), stages)
    expected = (4 * conv_module_params(128, 16, 1)  # PPM
                + conv_module_params(128 + 4 * 16, 16, 3)  # bottleneck
                + sum(conv_module_params(c, 16, 1) for c in (16, 32, 64))  # laterals
                + 3 * conv_module_params(16, 16, 3)  # fpn convs
                + conv_module_params(4 * 16, 16, 3)  # fpn_bottleneck
                + 16 * 5 + 5)
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == expected
    assert uper.apply(variables, stages).shape == (1, 16, 16, 5)
    fcn = heads.FCNHead(num_classes=5, channels=8)
    fcn_vars = fcn.init(jax.random.key(0), stages)
    assert sum(x.size for x in jax.tree.leaves(fcn_vars["params"])) == conv_module_params(64, 8, 3) + 8 * 5 + 5
    assert fcn.apply(fcn_vars, stages).shape == (1, 4, 4, 5)


def test_fpn_with_four_outputs_is_the_detection_fpn_without_p6():
    stages = [jax.random.normal(jax.random.key(i), (1, 32 // s, 48 // s, 8)) for i, s in enumerate((4, 8, 16, 32))]
    five, four = FPN(16, SpatialOp("conv")), FPN(16, SpatialOp("conv"), num_outs=4)
    variables = five.init(jax.random.key(0), stages)
    outs5, outs4 = five.apply(variables, stages), four.apply(variables, stages)
    assert len(outs5) == 5 and len(outs4) == 4
    for a, b in zip(outs4, outs5):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(outs5[4]), np.asarray(outs5[3][:, ::2, ::2]))


def tiny_segmentor(aux: bool):
    backbone = models.create("resnet50", stage_sizes=(1, 1, 1, 1), widths=(4, 8, 8, 8), stem_width=8)
    return EncoderDecoder(backbone, heads.FPNHead(3, 8), FPN(16, SpatialOp("conv"), num_outs=4),
                          heads.FCNHead(3, 8) if aux else None)


@pytest.mark.slow  # ~20 s of compiling; tests/test_experiments_cityscapes.py trains and predicts with an aux head too
def test_auxiliary_head_is_initialised_and_weighted_but_not_run_at_test_time():
    model = tiny_segmentor(aux=True)
    variables = jax.jit(lambda key: init_variables(model, key, (32, 32, 3)))(jax.random.key(0))
    assert "auxiliary_head" in variables["params"]
    images = jax.random.normal(jax.random.key(1), (2, 32, 40, 3))
    labels = jax.random.randint(jax.random.key(2), (2, 32, 40), 0, 3)

    @jax.jit
    def run(variables, images, labels):
        losses, _ = model.apply(variables, images, labels, method="losses", mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(3)})
        return losses, model.apply(variables, images, (16, 20), method="predict"), model.apply(variables, images)

    losses, pred, logits = run(variables, images, labels)
    assert float(losses["loss"]) == pytest.approx(float(losses["decode"] + 0.4 * losses["aux"]), rel=1e-6)
    assert pred.shape == (2, 16, 20) and pred.dtype == jnp.int32
    assert logits.shape == (2, 8, 10, 3)
    # predict: bilinear to the input, then to the requested size, then argmax.
    want = heads.resize_bilinear(heads.resize_bilinear(logits, (32, 40)), (16, 20)).argmax(-1)
    np.testing.assert_array_equal(np.asarray(pred), np.asarray(want))
