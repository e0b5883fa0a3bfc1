"""roi_align and multilevel_roi_align against numpy transcriptions of mmcv's CUDA kernels
(``roi_align_forward_cuda_kernel`` / ``roi_align_backward_cuda_kernel``, average mode): per RoI,
per bin, per sample, independent of the separable form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax.detection.roi_align import (DEFAULT_MAX_SAMPLING_RATIO, MAX_DIVISOR,
                                               _divide_rounded, _nearest_quotient,
                                               map_roi_levels, multilevel_roi_align, roi_align)

f32 = np.float32
# Sample coordinates of up to ~60 cells carry float32 rounding (an ulp there is ~4e-6) into the
# bilinear weights whichever way the same formula is evaluated (XLA may fuse a multiply-add).
ATOL = 1e-5


def bilinear_corners(height, width, y, x):
    """mmcv's bilinear_interpolate(_gradient): [(row, col, weight)] of one sample, or []."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y = f32(0) if y <= 0 else y
    x = f32(0) if x <= 0 else x
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = f32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = f32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = f32(y - f32(y_low)), f32(x - f32(x_low))
    hy, hx = f32(1) - ly, f32(1) - lx
    return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx),
            (y_high, x_high, ly * lx)]


def roi_samples(roi, out_h, out_w, spatial_scale, sampling_ratio, aligned, grid_cap):
    """Yields (ph, pw, y, x, count) for every sample, in mmcv's float32 arithmetic."""
    offset = f32(0.5) if aligned else f32(0)
    scale = f32(spatial_scale)
    start_w, start_h = f32(roi[0]) * scale - offset, f32(roi[1]) * scale - offset
    end_w, end_h = f32(roi[2]) * scale - offset, f32(roi[3]) * scale - offset
    roi_w, roi_h = f32(end_w - start_w), f32(end_h - start_h)
    if not aligned:
        roi_w, roi_h = max(roi_w, f32(1)), max(roi_h, f32(1))
    bin_h, bin_w = roi_h / f32(out_h), roi_w / f32(out_w)
    grid_h = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_h / f32(out_h)))
    grid_w = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_w / f32(out_w)))
    if grid_cap is not None:  # roi_align's documented behaviour past max_sampling_ratio
        grid_h, grid_w = min(grid_h, grid_cap), min(grid_w, grid_cap)
    count = max(grid_h * grid_w, 1)
    for ph in range(out_h):
        for pw in range(out_w):
            for iy in range(grid_h):
                y = start_h + f32(ph) * bin_h + f32(iy + 0.5) * bin_h / f32(grid_h)
                for ix in range(grid_w):
                    x = start_w + f32(pw) * bin_w + f32(ix + 0.5) * bin_w / f32(grid_w)
                    yield ph, pw, y, x, count


def numpy_roi_align(features, rois, output_size, spatial_scale, sampling_ratio=0, aligned=True,
                    grid_cap=None):
    """Forward kernel: each output is the mean of its bin's bilinear samples."""
    (out_h, out_w), (height, width, channels) = output_size, features.shape
    out = np.zeros((len(rois), out_h, out_w, channels))
    for r, roi in enumerate(rois):
        for ph, pw, y, x, count in roi_samples(roi, out_h, out_w, spatial_scale, sampling_ratio,
                                               aligned, grid_cap):
            for row, col, weight in bilinear_corners(height, width, y, x):
                out[r, ph, pw] += weight * features[row, col].astype(np.float64) / count
    return out


def numpy_roi_align_grad(features_shape, rois, grad_out, spatial_scale, sampling_ratio=0,
                         aligned=True):
    """Backward kernel: each sample's corners receive grad_out * w / count (atomicAdd)."""
    height, width, _ = features_shape
    out_h, out_w = grad_out.shape[1:3]
    grad = np.zeros(features_shape)
    for r, roi in enumerate(rois):
        for ph, pw, y, x, count in roi_samples(roi, out_h, out_w, spatial_scale, sampling_ratio,
                                               aligned, None):
            for row, col, weight in bilinear_corners(height, width, y, x):
                grad[row, col] += grad_out[r, ph, pw] * weight / count
    return grad


def random_rois(rng, image_h, image_w, n=6):
    """Image-pixel RoIs of every kind: inside, on the border, partly and fully outside, tiny,
    huge, of size zero, inverted."""
    def boxes(x1, y1, w, h):
        return np.stack([x1, y1, x1 + w, y1 + h], -1)

    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    kinds = [
        boxes(u(0, image_w / 2), u(0, image_h / 2), u(1, image_w / 2), u(1, image_h / 2)),  # inside
        np.stack([np.zeros(n), u(0, image_h / 2), np.full(n, image_w), np.full(n, image_h)], -1),
        boxes(u(-15, 0), u(-15, image_h), u(5, 30), u(5, 30)),  # partly outside
        boxes(u(image_w + 3, image_w + 20), u(-30, -5), u(1, 20), u(1, 8)),  # fully outside
        boxes(u(0, image_w), u(0, image_h), u(0.01, 0.8), u(0.01, 0.8)),  # tiny
        boxes(u(-40, -10), u(-40, -10), u(image_w + 20, 2 * image_w + 60),
              u(image_h + 20, 2 * image_h + 60)),  # huge
        boxes(u(0, image_w), u(0, image_h), np.zeros(n), u(0, 5)),  # zero width
        boxes(u(0, image_w), u(0, image_h), u(-8, -1), u(-8, -1)),  # inverted
    ]
    return np.concatenate(kinds).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(2, 4, 5, 6))
def jit_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned,
                  max_sampling_ratio):
    return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned,
                     max_sampling_ratio)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("shape", [(9, 13), (13, 9)])  # both matmul orders
def test_matches_mmcv_kernel_on_random_rois(shape, sampling_ratio, aligned):
    rng = np.random.default_rng(sum(shape) + 10 * sampling_ratio + aligned)
    features = rng.normal(size=shape + (3,)).astype(np.float32)
    spatial_scale = 0.5
    rois = random_rois(rng, shape[0] * 2, shape[1] * 2)
    output_size = (3, 4)  # non-square, so mixing up the axes shows
    # A cap above every RoI's adaptive grid (the huge RoIs need ceil(110 / 3) = 37): exact.
    got = jit_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned, 40)
    expected = numpy_roi_align(features, rois, output_size, spatial_scale, sampling_ratio,
                               aligned)
    assert got.dtype == jnp.float32 and got.shape == (len(rois), 3, 4, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=ATOL)
    # RoIs of size <= 0 with aligned get no samples: 0, like mmcv. (Without aligned they are
    # clamped to size 1 and sampled.)
    assert np.abs(expected).sum(axis=(1, 2, 3)).min() == 0
    # Fully outside RoIs (rows 18-23) read nothing.
    np.testing.assert_array_equal(np.asarray(got)[18:24], 0)


def test_seven_by_seven_and_default_cap_exact_within_the_cap():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(20, 24, 2)).astype(np.float32)
    # Extents up to 16 * 7 = 112 cells per axis at spatial scale 1: exact with the default cap.
    xy = rng.uniform(-10, 15, (12, 2))
    rois = np.concatenate([xy, xy + rng.uniform(0.5, 110, (12, 2))], 1).astype(np.float32)
    got = roi_align(features, rois, 7, 1.0)
    expected = numpy_roi_align(features, rois, (7, 7), 1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=ATOL)


def test_past_the_cap_samples_like_a_fixed_ratio_of_the_cap():
    rng = np.random.default_rng(8)
    features = rng.normal(size=(10, 12, 2)).astype(np.float32)
    rois = np.array([[-20, -5, 60, 70], [0, 0, 5, 4], [-3, 2, 40, 4]], np.float32)
    cap = 3
    got = jit_roi_align(features, rois, (2, 2), 1.0, 0, True, cap)
    expected = numpy_roi_align(features, rois, (2, 2), 1.0, grid_cap=cap)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=ATOL)
    # ... which differs from mmcv's adaptive grid for the RoIs past it.
    exact = numpy_roi_align(features, rois, (2, 2), 1.0)
    assert not np.allclose(got[0], exact[0], atol=1e-3)
    np.testing.assert_allclose(got[1], exact[1], rtol=1e-5, atol=ATOL)  # grid 2 x 3: within
    assert DEFAULT_MAX_SAMPLING_RATIO >= 8


def test_single_row_and_column_maps():
    rng = np.random.default_rng(9)
    rois = random_rois(rng, 8, 8, n=2)
    for shape in [(1, 6), (6, 1)]:
        features = rng.normal(size=shape + (2,)).astype(np.float32)
        got = roi_align(features, rois, 2, 0.5, max_sampling_ratio=40)
        np.testing.assert_allclose(got, numpy_roi_align(features, rois, (2, 2), 0.5),
                                   rtol=1e-5, atol=ATOL)


def test_padding_rows_are_finite_and_zero():
    features = np.ones((6, 7, 2), np.float32)
    rois = np.array([[0, 0, 0, 0], [np.nan] * 4, [0, 0, np.inf, 5], [-np.inf, 0, np.inf, 5],
                     [1e30, 1e30, 2e30, 2e30], [-1e30, -1e30, 1e30, 1e30], [1, 1, 5, 5]],
                    np.float32)
    for aligned in (True, False):
        got = np.asarray(roi_align(features, rois, 2, 1.0, aligned=aligned))
        assert np.isfinite(got).all()
        assert (got[:2] == 0).all() if aligned else (got[1] == 0).all()
        np.testing.assert_allclose(got[-1], 1, rtol=1e-6)  # a real RoI of a constant map
    grad = jax.grad(lambda f: roi_align(f, rois, 2, 1.0).sum())(features)
    assert np.isfinite(np.asarray(grad)).all()


def test_bfloat16_features_accumulate_in_float32():
    rng = np.random.default_rng(10)
    features = rng.normal(size=(9, 11, 4)).astype(np.float32)
    rois = random_rois(rng, 18, 22, n=2)
    got = roi_align(jnp.asarray(features, jnp.bfloat16), rois, 3, 0.5, max_sampling_ratio=40)
    assert got.dtype == jnp.bfloat16
    expected = numpy_roi_align(np.asarray(jnp.asarray(features, jnp.bfloat16), np.float32),
                               rois, (3, 3), 0.5)
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("aligned", [True, False])
def test_gradient_matches_mmcv_backward_kernel(aligned):
    rng = np.random.default_rng(11 + aligned)
    features = rng.normal(size=(8, 10, 2)).astype(np.float32)
    rois = random_rois(rng, 16, 20, n=2)
    grad_out = rng.normal(size=(len(rois), 3, 3, 2)).astype(np.float32)

    def loss(features, rois):
        return jnp.sum(roi_align(features, rois, 3, 0.5, aligned=aligned,
                                 max_sampling_ratio=40) * grad_out)

    grad_features, grad_rois = jax.jit(jax.grad(loss, argnums=(0, 1)))(features, rois)
    expected = numpy_roi_align_grad(features.shape, rois, grad_out, 0.5, aligned=aligned)
    np.testing.assert_allclose(grad_features, expected, rtol=1e-5, atol=1e-5)
    # mmcv's roi_align has no gradient for the RoIs.
    np.testing.assert_array_equal(grad_rois, 0)
    # The op is linear in the features: a finite difference along any direction is exact.
    direction = rng.normal(size=features.shape).astype(np.float32)
    step = 0.5
    diff = (loss(features + step * direction, rois) - loss(features - step * direction, rois))
    np.testing.assert_allclose(diff / (2 * step), np.sum(expected * direction), rtol=1e-3)


def test_divide_rounded_is_ieee_division_under_jit():
    # XLA turns a division by a constant or a broadcast into a multiplication by the reciprocal:
    # 21 / 7 becomes 21 * 0.14285715 = 3.0000002.
    rng = np.random.default_rng(14)
    wide = rng.uniform(-1, 1, 20000) * 10.0 ** rng.uniform(-6, 6, 20000)
    for divisor in [1, 3, 7, 12, 14, 28, 16, 100, MAX_DIVISOR]:
        multiples = np.arange(-500, 500) * divisor  # exact quotients
        quarters = rng.integers(1, 2**16, 1000) * divisor / 4
        numerator = np.concatenate([wide, multiples, quarters, [0.0, -0.0]]).astype(np.float32)
        got = np.asarray(jax.jit(lambda x: _divide_rounded(x, divisor))(numerator))
        np.testing.assert_array_equal(got, numerator / np.float32(divisor))
    # A traced divisor per row, as the sample counts per RoI are.
    divisor = rng.integers(1, 17, (300, 1)).astype(np.float32)
    numerator = ((np.arange(16, dtype=np.float32) + 0.5) * rng.integers(1, 60, (300, 1))
                 * rng.choice([1, 0.25, 1 / 3], (300, 1))).astype(np.float32)
    got = np.asarray(jax.jit(_divide_rounded)(numerator, divisor))
    np.testing.assert_array_equal(got, numerator / divisor)
    special = jax.jit(_divide_rounded)(np.array([np.nan, np.inf, -np.inf], np.float32), 7.0)
    np.testing.assert_array_equal(special, [np.nan, np.inf, -np.inf])


def test_nearest_quotient_corrects_an_estimate_up_to_3_ulp_off():
    # XLA's float32 division on NVIDIA GPUs (PTX div.full.f32) may be 2 ulp off; emulate that
    # and worse here, where the CPU divides exactly.
    rng = np.random.default_rng(15)
    numerator = np.concatenate([rng.uniform(-1, 1, 5000) * 10.0 ** rng.uniform(-4, 4, 5000),
                                np.arange(1, 2000) * 7.0]).astype(np.float32)
    for divisor in [3, 7, 14, 28]:
        exact = numerator / np.float32(divisor)
        steps = rng.integers(-3, 4, len(numerator))
        estimate = exact
        for _ in range(3):
            estimate = np.where(steps > 0, np.nextafter(estimate, np.float32(np.inf)),
                                np.where(steps < 0, np.nextafter(estimate, np.float32(-np.inf)),
                                         estimate))
            steps = steps - np.sign(steps)
        assert (estimate != exact).mean() > 0.5
        got = jax.jit(_nearest_quotient)(numerator, np.float32(divisor), estimate)
        np.testing.assert_array_equal(got, exact)


def border_samples(rois, output_size, spatial_scale, aligned, height, width):
    """How many of mmcv's samples lie exactly on y = -1 or y = height, and on x = -1 or width."""
    on_y = on_x = 0
    for roi in rois:
        for _, _, y, x, _ in roi_samples(roi, *output_size, spatial_scale, 0, aligned, None):
            on_y += y in (-1, height)
            on_x += x in (-1, width)
    return on_y, on_x


def exact_multiple_rois(rng, stride, out, extents, aligned, height, width):
    """Integer image-pixel RoIs ``[3 * len(extents), 4]`` of ``(kh * out, kw * out)`` feature
    cells at ``stride`` for each ``(kh, kw)`` in ``extents`` on a ``height x width`` map: one
    whose samples fall exactly on the map's top and left borders (y = x = -1), one on its bottom
    and right borders (y = height, x = width), and one at a random integer position."""
    # One sample per cell, at start + j + 0.5 with start = x1 / stride (- 0.5 when aligned):
    # on whole numbers when x1 / stride is a whole number (aligned) or one and a half (not).
    half = 0.0 if aligned else 0.5
    rois = []
    for kh, kw in extents:
        h, w = kh * out * stride, kw * out * stride
        for y1, x1 in [((-1 - half) * stride, (-1 - half) * stride),
                       ((height - 2 - half) * stride, (width - 2 - half) * stride),
                       tuple(rng.integers(-2 * stride, stride * np.array([height, width])))]:
            rois.append([x1, y1, x1 + w, y1 + h])
    rois = np.array(rois, np.float32)
    np.testing.assert_array_equal(rois, np.round(rois))
    return rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("out", [7, 14, 28])  # the box head, the mask head, mask targets
def test_exact_multiples_of_the_output_size_at_every_fpn_stride(out, aligned):
    # Extents of 1 to 3 times the output size in cells: mmcv's bins hold exactly 1 to 3 cells
    # and as many samples per axis. 3 is the first multiple whose quotient a multiplication by
    # the reciprocal gets wrong (3.0000002: one sample more, and border samples outside).
    rng = np.random.default_rng(16 + out + aligned)
    height, width = 2 * out + 3, 2 * out + 5
    features = rng.normal(size=(height, width, 2)).astype(np.float32)
    extents = [(1, 3), (3, 1)] if out == 28 else [(1, 1), (2, 3), (3, 2)]
    for stride in (4, 8, 16, 32):
        rois = exact_multiple_rois(rng, stride, out, extents, aligned, height, width)
        on_y, on_x = border_samples(rois, (out, out), 1 / stride, aligned, height, width)
        assert on_y > 0 and on_x > 0
        expected = numpy_roi_align(features, rois, (out, out), 1 / stride, aligned=aligned)
        got = roi_align(features, rois, out, 1 / stride, aligned=aligned)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=ATOL)
        got = jit_roi_align(features, rois, (out, out), 1 / stride, 0, aligned,
                            DEFAULT_MAX_SAMPLING_RATIO)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("out", [7, 14])
def test_multilevel_exact_multiples_at_every_level(out, aligned):
    rng = np.random.default_rng(17 + out + aligned)
    strides = (4, 8, 16, 32)
    image_h, image_w = 256, 320
    shapes = [(image_h // s, image_w // s) for s in strides]
    features = [rng.normal(size=(1,) + shape + (2,)).astype(np.float32) for shape in shapes]
    # (level, kh, kw): RoIs of (kh * out, kw * out) cells at the level's stride, whose size
    # sqrt(w * h) in pixels maps them to that level.
    if out == 7:
        specs = [(0, 1, 2), (0, 2, 3), (1, 2, 3), (1, 3, 3), (2, 2, 3), (2, 3, 3), (3, 2, 3),
                 (3, 3, 4)]
    else:
        specs = [(0, 1, 1), (0, 1, 3), (1, 1, 3), (1, 3, 1), (2, 3, 1), (2, 1, 2), (3, 1, 3),
                 (3, 2, 2)]
    rois, levels = [], []
    for level, kh, kw in specs:
        level_rois = exact_multiple_rois(rng, strides[level], out, [(kh, kw)], aligned,
                                         *shapes[level])
        rois.append(level_rois)
        levels += [level] * len(level_rois)
    rois = np.concatenate(rois)
    assert np.asarray(map_roi_levels(rois, 4)).tolist() == levels
    pool = jax.jit(functools.partial(multilevel_roi_align, output_size=out, strides=strides,
                                     aligned=aligned))
    got = np.asarray(pool(features, rois[None]))[0]
    for r, (roi, level) in enumerate(zip(rois, levels)):
        expected = numpy_roi_align(features[level][0], roi[None], (out, out),
                                   1 / strides[level], aligned=aligned)
        np.testing.assert_allclose(got[r], expected[0], rtol=1e-5, atol=ATOL)


def test_map_roi_levels_by_hand():
    # scale = sqrt(w * h); level = floor(log2(scale / 56 + 1e-6)) clipped to [0, 3].
    sides = [(10, 10), (111.9, 111.9), (112, 112), (56, 224), (223.9, 223.9), (224, 224),
             (448, 448), (447, 448), (2000, 2000), (0, 0), (50, 500)]
    rois = np.array([[5, 7, 5 + w, 7 + h] for w, h in sides], np.float32)
    levels = np.asarray(map_roi_levels(rois, 4))
    # (50, 500): sqrt(25000) = 158.1 -> log2(2.82) = 1.5 -> level 1.
    assert levels.tolist() == [0, 0, 1, 1, 1, 2, 3, 2, 3, 0, 1]
    inverted = np.array([[10, 10, 5, 20]], np.float32)  # negative area: NaN scale, no level
    assert np.asarray(map_roi_levels(inverted, 4)).tolist() == [-1]
    assert np.asarray(map_roi_levels(rois, 2, finest_scale=28)).tolist() == [
        0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1]


def test_multilevel_pools_each_roi_from_its_level():
    rng = np.random.default_rng(12)
    strides = (4, 8, 16, 32)
    image = 256
    features = [rng.normal(size=(2, image // s, image // s, 3)).astype(np.float32)
                for s in strides]
    sides = np.array([20, 80, 130, 200, 300, 500, 600, 30])  # levels 0, 0, 1, 1, 2, 3, 3, 0
    xy = rng.uniform(-20, 150, (2, len(sides), 2))
    wh = sides[None, :, None] * rng.uniform(0.8, 1.25, (2, len(sides), 2))
    rois = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    rois[1, -1] = 0  # a padding row
    rois[0, -1] = [np.nan] * 4  # another
    got = multilevel_roi_align(features, rois, 2, strides, max_sampling_ratio=40)
    assert got.shape == (2, len(sides), 2, 2, 3)
    got = np.asarray(got)
    levels = np.asarray(map_roi_levels(rois, 4))
    assert set(levels[:, :-1].ravel()) == {0, 1, 2, 3}
    for b in range(2):
        for r in range(len(sides)):
            level = levels[b, r]
            if level < 0:
                np.testing.assert_array_equal(got[b, r], 0)
                continue
            expected = numpy_roi_align(features[level][b], rois[b, r:r + 1], (2, 2),
                                       1 / strides[level])
            np.testing.assert_allclose(got[b, r], expected[0], rtol=1e-5, atol=ATOL)
    np.testing.assert_array_equal(got[1, -1], 0)
    assert np.isfinite(got).all()


def test_multilevel_gradient_reaches_only_the_mapped_level():
    rng = np.random.default_rng(13)
    features = [rng.normal(size=(1, 16 // s, 16 // s, 2)).astype(np.float32) for s in (1, 2)]
    rois = np.array([[[1, 1, 6, 6], [np.nan] * 4]], np.float32)  # level 0 (finest_scale 4)
    grads = jax.grad(lambda f: multilevel_roi_align(f, rois, 2, (1, 2), finest_scale=4).sum())(
        features)
    assert np.abs(np.asarray(grads[0])).sum() > 0
    np.testing.assert_array_equal(grads[1], 0)


def test_rejects_bad_arguments():
    features = np.zeros((4, 4, 1), np.float32)
    with pytest.raises(ValueError, match=r"features \[H, W, C\] and rois \[R, 4\]"):
        roi_align(features[None], np.zeros((1, 4)), 2, 1.0)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(features, np.zeros((1, 4)), (2, 0), 1.0)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(features, np.zeros((1, 4)), 2, 1.0, sampling_ratio=-1)
    with pytest.raises(ValueError, match=r"output_size must be an int in \[1, 4095\]"):
        roi_align(features, np.zeros((1, 4)), MAX_DIVISOR + 1, 1.0)
    with pytest.raises(ValueError, match=r"max_sampling_ratio must be an int in \[1, 4095\]"):
        roi_align(features, np.zeros((1, 4)), 2, 1.0, max_sampling_ratio=MAX_DIVISOR + 1)
    with pytest.raises(ValueError, match="one stride per feature level"):
        multilevel_roi_align([features[None]], np.zeros((1, 1, 4)), 2, (4, 8))
    with pytest.raises(ValueError, match=r"rois \[B, R, 4\]"):
        multilevel_roi_align([features[None]], np.zeros((2, 1, 4)), 2, (4,))


def test_no_rois_gives_an_empty_result():
    features = jnp.ones((6, 5, 3))
    out = roi_align(features, jnp.zeros((0, 4)), 7, 1.0)
    assert out.shape == (0, 7, 7, 3)
    levels = [jnp.ones((2, 8, 8, 3)), jnp.ones((2, 4, 4, 3))]
    assert multilevel_roi_align(levels, jnp.zeros((2, 0, 4)), (7, 7), (4, 8)).shape == (2, 0, 7, 7, 3)
