"""RoIAlign (mmcv's ``roi_align``, average mode) and mmdet's FPN RoI extractor, in jnp with static
shapes.

Semantics are those of mmcv's CUDA kernel (``roi_align_forward_cuda_kernel`` with
``pool_mode='avg'``), checked against a per-sample numpy transcription in the tests:

- an RoI ``(x1, y1, x2, y2)`` in image pixels becomes ``x1 * spatial_scale - 0.5`` etc. when
  ``aligned`` (pixel centres at half-integers); without ``aligned`` there is no ``-0.5`` and the
  RoI's width and height are clamped to at least 1 (the legacy Detectron behaviour);
- each of the ``out_h x out_w`` bins is averaged over a ``gy x gx`` grid of sample points at the
  centres of a regular subdivision of the bin; ``sampling_ratio > 0`` fixes ``gy = gx =
  sampling_ratio``, ``sampling_ratio = 0`` takes ``gy = ceil(roi_h / out_h)`` and
  ``gx = ceil(roi_w / out_w)`` per RoI (with ``aligned``, an RoI of size 0 or less gets no
  samples and output 0);
- a sample is bilinearly interpolated with mmcv's border rules: a sample with ``y < -1`` or
  ``y > H`` (or ``x`` likewise) contributes 0; otherwise ``y`` is clamped into ``[0, H - 1]``
  (``y <= 0`` reads row 0, ``y >= H - 1`` reads row ``H - 1`` only).

The separable form. The sample grid of a bin is a product (rows ``y_iy`` times columns
``x_ix``), mmcv's border test is a product of a test on ``y`` and one on ``x``, and the bilinear
weights are products ``w_y * w_x``, so::

    out[r, ph, pw, c] = sum_{h, w} Wy[r, ph, h] * Wx[r, pw, w] * F[h, w, c]
    Wy[r, ph, h] = (1 / gy_r) * sum_{iy < gy_r} (bilinear weight of sample y_{r, ph, iy} on row h)

and likewise ``Wx``. The op is two matmuls against small dense weight matrices ``[R, out, H]``
and ``[R, out, W]``: its gradient w.r.t. the features is two matmuls too, with no scatter-add.

Static shapes need a static number of samples per bin. With ``sampling_ratio = 0`` the weight
matrices are built from ``max_sampling_ratio`` candidate samples per bin and axis, of which the
first ``gy_r`` are used (the others are masked), so the result is exactly mmcv's whenever
``ceil(roi_h / out_h) <= max_sampling_ratio`` (and likewise for ``x``). Past the cap, the axis is
sampled as if ``sampling_ratio = max_sampling_ratio``: the same evenly spaced, averaged grid of a
bin with ``max_sampling_ratio`` points, so bins wider than ``max_sampling_ratio`` feature cells
skip some cells (mmcv would average more points). The default cap 16 is exact for RoI extents up
to ``16 * 7 = 112`` feature cells per axis at a 7x7 output (224 at the mask head's 14x14): with
mmdet's level mapping that covers every RoI on the coarsest level of an image up to 3584 pixels
at stride 32, and on the finer levels RoIs of aspect ratio up to 16 (a level-``k`` RoI has
``sqrt(w * h) < 112 * 2**k`` pixels, i.e. fewer than 28 cells, so its long side is under
``28 * sqrt(aspect)`` cells). The cap costs only in building the weight matrices (``R * out * cap
* H`` elementwise work, small next to the matmul).

Exact quotients. The bin size ``roi_h / out_h`` and the sample offset ``(i + 0.5) * bin /
grid`` are float32 divisions rounded to nearest in mmcv, and a one-ulp error there is not small:
``ceil`` turns 21 cells over 7 bins into 4 samples per bin instead of 3 when the quotient comes
out as 3.0000002, and a sample exactly on the map's border (``y = -1`` or ``y = H``, where mmcv
still reads the edge row) falls outside. XLA rounds neither division correctly: it rewrites a
division by a constant or a broadcast into a multiplication by the reciprocal (``21 * (1 / 7)``
is 3.0000002), and on NVIDIA GPUs it compiles float32 division to an approximate instruction
(PTX ``div.full.f32``, up to 2 ulp). ``_divide_rounded`` corrects XLA's quotient to the correctly
rounded one for the integer divisors that occur here (up to ``MAX_DIVISOR``).

RoIs get no gradient (``stop_gradient``), as mmcv's ``roi_align`` returns none for them; mmdet
detaches proposals before RoI extraction anyway.
"""

import functools

import jax
import jax.numpy as jnp

# Samples per bin and axis built into the weight matrices when sampling_ratio = 0 (see the module
# docstring for what it covers and what happens past it).
DEFAULT_MAX_SAMPLING_RATIO = 16
# The largest output size and samples per bin: _divide_rounded is exact for divisors of 12 bits.
MAX_DIVISOR = 2**12 - 1
# Clears the low 12 of a float32's 23 stored significand bits, leaving 12 significant bits.
_HIGH_HALF_MASK = -(2**12)


def _divide_rounded(numerator, divisor):
    """``numerator / divisor`` correctly rounded to float32, as IEEE (and mmcv's kernel) divide.

    Args:
      numerator: float32 array.
      divisor: float32 array broadcastable to ``numerator`` holding integers in ``[1,
        MAX_DIVISOR]`` (a bin count or a sample count).

    Returns:
      float32 array of the broadcast shape. Non-finite numerators give XLA's quotient (NaN or
      infinity).
    """
    numerator = jnp.asarray(numerator, jnp.float32)
    divisor = jnp.asarray(divisor, jnp.float32)
    return _nearest_quotient(numerator, divisor, numerator / divisor)


def _nearest_quotient(numerator, divisor, estimate):
    """The float32 nearest ``numerator / divisor``, given an ``estimate`` within 3 ulp of it.

    One correction with an exact residual: ``estimate + (numerator - estimate * divisor) /
    divisor``. The residual is exact, whatever the rounding or fused multiply-adds: the estimate
    is split into a high part of 12 significant bits and the rest, each of whose products with a
    divisor of at most 12 bits is exact; the high product is within a factor 2 of the numerator,
    so subtracting it is exact (Sterbenz), and what remains is a few ulp of the estimate times the
    divisor, which float32 holds exactly too. The correction's own division may be a few ulp off
    (a few millionths of an ulp of the quotient), far less than the distance from
    ``numerator / divisor`` to any midpoint between floats, at least ``ulp / (4 * divisor)``; so
    the final addition, correctly rounded, gives the nearest float.
    """
    f32 = jnp.float32
    bits = jax.lax.bitcast_convert_type(estimate, jnp.int32)
    high = jax.lax.bitcast_convert_type(bits & _HIGH_HALF_MASK, f32)
    low = estimate - high
    residual = (numerator - high * divisor) - low * divisor
    nearest = estimate + residual / divisor
    # Non-finite estimates (from NaN or infinite numerators) have no residual: keep them.
    return jnp.where(jnp.isfinite(nearest), nearest, estimate)


def _output_size(output_size):
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    output_size = tuple(output_size)
    if (len(output_size) != 2
            or any(not isinstance(n, int) or not 0 < n <= MAX_DIVISOR for n in output_size)):
        raise ValueError(
            f"output_size must be an int in [1, {MAX_DIVISOR}] or (height, width) of such ints; "
            f"got {output_size!r}.")
    return output_size


def _check_sampling(sampling_ratio, max_sampling_ratio):
    if not isinstance(sampling_ratio, int) or not 0 <= sampling_ratio <= MAX_DIVISOR:
        raise ValueError(
            f"sampling_ratio must be an int in [0, {MAX_DIVISOR}] (0: adaptive); got "
            f"{sampling_ratio!r}.")
    if not isinstance(max_sampling_ratio, int) or not 0 < max_sampling_ratio <= MAX_DIVISOR:
        raise ValueError(
            f"max_sampling_ratio must be an int in [1, {MAX_DIVISOR}]; got "
            f"{max_sampling_ratio!r}.")


def _axis_weights(start, end, out_size, size, spatial_scale, sampling_ratio, max_sampling_ratio,
                  aligned):
    """Interpolation-and-average weights of one axis.

    Args:
      start, end: ``[R]`` float32 RoI edges on this axis in image pixels (``x1, x2`` or
        ``y1, y2``).
      out_size: static number of bins on this axis.
      size: static feature-map extent on this axis (``H`` or ``W``).
      spatial_scale: feature cells per image pixel (may be traced).
      sampling_ratio, max_sampling_ratio, aligned: as in ``roi_align``.

    Returns:
      ``[R, out_size, size]`` float32 ``W`` with ``W[r, p, h] = (1 / g_r) * sum_{i < g_r}``
      (bilinear weight of sample ``i`` of bin ``p`` on cell ``h``), zero for RoIs with no samples.
    """
    f32 = jnp.float32
    offset = 0.5 if aligned else 0.0
    start = start * jnp.asarray(spatial_scale, f32) - offset
    end = end * jnp.asarray(spatial_scale, f32) - offset
    length = end - start
    if not aligned:
        length = jnp.maximum(length, 1.0)
    bin_size = _divide_rounded(length, out_size)
    if sampling_ratio > 0:
        num_samples = sampling_ratio
        grid = jnp.full_like(length, sampling_ratio)
    else:
        num_samples = max_sampling_ratio
        # mmcv's ceilf(roi_height / pooled_height), capped; NaN (from NaN padding rows) stays NaN
        # and so fails every comparison below: no samples.
        grid = jnp.minimum(jnp.ceil(bin_size), max_sampling_ratio)
    has_samples = grid >= 1  # a zero or negative grid runs no loop iteration in mmcv: output 0
    safe_grid = jnp.where(has_samples, grid, 1)

    bins = jnp.arange(out_size, dtype=f32)[:, None]  # [out, 1]
    samples = jnp.arange(num_samples, dtype=f32)  # [S]
    start, bin_size, safe_grid = (v[:, None, None] for v in (start, bin_size, safe_grid))
    # mmcv's expression and order: start + p * bin + (i + 0.5) * bin / grid.
    coord = start + bins * bin_size + _divide_rounded((samples + 0.5) * bin_size, safe_grid)
    used = (samples < grid[:, None, None]) & (coord >= -1.0) & (coord <= size)
    coord = jnp.where(used, coord, 0.0)  # unused samples (or NaN / inf rows) read a finite 0
    # mmcv clamps y <= 0 to 0, and y whose floor is >= size - 1 to size - 1 (reading that cell
    # alone); clip + floor gives the same low cell and fraction.
    coord = jnp.clip(coord, 0.0, size - 1)
    low = jnp.floor(coord)
    frac = coord - low
    scale = jnp.where(used, 1.0 / safe_grid, 0.0)
    cells = jnp.arange(size, dtype=f32)
    # [R, out, S, size], reduced over S at once (XLA fuses the product into the reduction).
    weights = (jnp.where(cells == low[..., None], 1.0 - frac[..., None], 0.0)
               + jnp.where(cells == low[..., None] + 1.0, frac[..., None], 0.0))
    return jnp.sum(weights * scale[..., None], axis=2)


def _roi_weights(rois, feature_size, output_size, spatial_scale, sampling_ratio,
                 max_sampling_ratio, aligned):
    """``(Wy [R, out_h, H], Wx [R, out_w, W])`` for ``rois [R, 4]``."""
    rois = jax.lax.stop_gradient(rois.astype(jnp.float32))
    (height, width), (out_h, out_w) = feature_size, output_size
    wy = _axis_weights(rois[:, 1], rois[:, 3], out_h, height, spatial_scale, sampling_ratio,
                       max_sampling_ratio, aligned)
    wx = _axis_weights(rois[:, 0], rois[:, 2], out_w, width, spatial_scale, sampling_ratio,
                       max_sampling_ratio, aligned)
    return wy, wx


def _pool(features, wy, wx, precision):
    """``out[r, p, q, c] = sum_{h, w} wy[r, p, h] wx[r, q, w] features[h, w, c]`` in float32.

    The first matmul contracts the longer spatial axis, so the intermediate ``[R, out, min(H, W),
    C]`` is the smaller one; it is a single ``[R * out, H] x [H, W * C]`` GEMM and dominates the
    cost: ``2 * R * out * H * W * C`` flops.
    """
    features = features.astype(jnp.float32)
    einsum = functools.partial(jnp.einsum, precision=precision,
                               preferred_element_type=jnp.float32)
    if features.shape[0] >= features.shape[1]:
        rows = einsum("rph,hwc->rpwc", wy, features)
        return einsum("rqw,rpwc->rpqc", wx, rows)
    columns = einsum("rqw,hwc->rqhc", wx, features)
    return einsum("rph,rqhc->rpqc", wy, columns)


def roi_align(features, rois, output_size, spatial_scale, sampling_ratio=0, aligned=True,
              max_sampling_ratio=DEFAULT_MAX_SAMPLING_RATIO, precision=None):
    """mmcv's ``roi_align`` (average pooling) for one image.

    Args:
      features: ``[H, W, C]`` feature map (NHWC, one image), any float dtype.
      rois: ``[R, 4]`` boxes ``(x1, y1, x2, y2)`` in image pixels. Padding rows may hold any
        values (zeros, NaN, inf): their output is finite (zero for RoIs of size 0 or NaN with
        ``aligned``). RoIs get no gradient.
      output_size: static int or ``(out_h, out_w)``.
      spatial_scale: feature cells per image pixel (``1 / stride``); may be traced.
      sampling_ratio: static; samples per bin and axis, or 0 for ``ceil(roi_size / out_size)``
        per RoI and axis.
      aligned: static; mmcv's ``aligned`` (True: half-pixel offset, no size clamp).
      max_sampling_ratio: static cap on the adaptive samples per bin and axis; exact up to it,
        coarser past it (see the module docstring).
      precision: passed to the two matmuls (``None``: the backend default, e.g. TF32 on recent
        NVIDIA GPUs; ``jax.lax.Precision.HIGHEST`` for full float32).

    Returns:
      ``[R, out_h, out_w, C]`` in ``features.dtype``, accumulated in float32.
    """
    output_size = _output_size(output_size)
    _check_sampling(sampling_ratio, max_sampling_ratio)
    features = jnp.asarray(features)
    rois = jnp.asarray(rois)
    if features.ndim != 3 or rois.ndim != 2 or rois.shape[-1] != 4:
        raise ValueError(
            f"roi_align takes features [H, W, C] and rois [R, 4]; got {features.shape} and "
            f"{rois.shape}. Use multilevel_roi_align (or vmap) for a batch.")
    return _roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned,
                      max_sampling_ratio, precision)


@functools.partial(jax.jit, static_argnums=(2, 4, 5, 6, 7))
def _roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned,
               max_sampling_ratio, precision):
    wy, wx = _roi_weights(rois, features.shape[:2], output_size, spatial_scale, sampling_ratio,
                          max_sampling_ratio, aligned)
    return _pool(features, wy, wx, precision).astype(features.dtype)


def map_roi_levels(rois, num_levels, finest_scale=56):
    """mmdet's ``SingleRoIExtractor.map_roi_levels``: the FPN level of each RoI.

    ``scale = sqrt(w * h)``, ``level = floor(log2(scale / finest_scale + 1e-6))`` clipped to
    ``[0, num_levels - 1]``: level 0 below ``2 * finest_scale`` (112 pixels), level ``k`` for
    scales in ``[finest_scale * 2**k, finest_scale * 2**(k + 1))``.

    Args:
      rois: ``[..., 4]`` boxes in image pixels.
      num_levels: static number of levels.
      finest_scale: the scale of level 0's lower half (mmdet's default 56).

    Returns:
      ``[...]`` int32 levels. An RoI of negative area (NaN scale) gets -1, i.e. no level and
      zero features, as in mmdet, whose integer cast of NaN matches no level.
    """
    rois = jnp.asarray(rois).astype(jnp.float32)
    scale = jnp.sqrt((rois[..., 2] - rois[..., 0]) * (rois[..., 3] - rois[..., 1]))
    level = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
    level = jnp.clip(level, 0, num_levels - 1)
    return jnp.where(jnp.isnan(level), -1, level).astype(jnp.int32)


def multilevel_roi_align(features, rois, output_size, strides, finest_scale=56, sampling_ratio=0,
                         aligned=True, max_sampling_ratio=DEFAULT_MAX_SAMPLING_RATIO,
                         precision=None):
    """mmdet's ``SingleRoIExtractor`` with RoIAlign over FPN levels, for a batch.

    Each RoI is pooled from the level ``map_roi_levels`` gives it, with ``spatial_scale = 1 /
    stride`` of that level.

    Static shapes: every level is pooled for every RoI, with the weight matrices of RoIs mapped
    elsewhere zeroed, and the levels summed. The cost is that of pooling all RoIs on every level,
    dominated by the finest: about ``2 * R * out_h * H_0 * W_0 * C * 4 / 3`` flops per image
    forward and the same again for the features' gradient: for 512 RoIs at 7x7, 256 channels and
    P2-P5 of a 1344x832 image, XLA's cost analysis counts 176 GFLOP per image each way,
    comparable to the whole backbone's forward, and the float32 intermediate ``[R, out_h,
    min(H_l, W_l), C]`` is ~0.75 GB per image on P2. A gather form for the finest level is the
    known remedy if this shows up in profiles.

    Args:
      features: a list of per-level ``[B, H_l, W_l, C]`` maps (e.g. FPN P2-P5), finest first,
        all of one dtype and channel count.
      rois: ``[B, R, 4]`` boxes in image pixels; padding rows may hold any values.
      output_size: static int or ``(out_h, out_w)``.
      strides: static, one per level (e.g. ``(4, 8, 16, 32)``).
      finest_scale: as in ``map_roi_levels``.
      sampling_ratio, aligned, max_sampling_ratio, precision: as in ``roi_align``.

    Returns:
      ``[B, R, out_h, out_w, C]`` in the features' dtype.
    """
    output_size = _output_size(output_size)
    _check_sampling(sampling_ratio, max_sampling_ratio)
    features = [jnp.asarray(f) for f in features]
    rois = jnp.asarray(rois)
    strides = tuple(strides)
    if not features or len(features) != len(strides):
        raise ValueError(
            f"need one stride per feature level; got {len(features)} levels and strides "
            f"{strides!r}.")
    batch = rois.shape[0] if rois.ndim == 3 else -1
    if (rois.ndim != 3 or rois.shape[-1] != 4
            or any(f.ndim != 4 or f.shape[0] != batch or f.shape[-1] != features[0].shape[-1]
                   or f.dtype != features[0].dtype for f in features)):
        raise ValueError(
            "multilevel_roi_align takes rois [B, R, 4] and features [B, H_l, W_l, C] of one "
            f"dtype; got rois {rois.shape} and features "
            f"{[(f.shape, str(f.dtype)) for f in features]}.")
    return _multilevel_roi_align(features, rois, output_size, strides, finest_scale,
                                 sampling_ratio, aligned, max_sampling_ratio, precision)


@functools.partial(jax.jit, static_argnums=(2, 3, 5, 6, 7, 8))
def _multilevel_roi_align(features, rois, output_size, strides, finest_scale, sampling_ratio,
                          aligned, max_sampling_ratio, precision):
    def one_image(features, rois):
        levels = map_roi_levels(rois, len(features), finest_scale)
        out = 0.0
        for level, (level_features, stride) in enumerate(zip(features, strides)):
            wy, wx = _roi_weights(rois, level_features.shape[:2], output_size, 1.0 / stride,
                                  sampling_ratio, max_sampling_ratio, aligned)
            # Zeroing one factor is enough: RoIs of other levels get 0 here, and no gradient.
            wy = jnp.where((levels == level)[:, None, None], wy, 0.0)
            out = out + _pool(level_features, wy, wx, precision)
        return out

    return jax.vmap(one_image)(features, rois).astype(features[0].dtype)
