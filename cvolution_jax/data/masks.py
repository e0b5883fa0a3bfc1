"""Host-side instance masks (numpy): COCO segmentations checked and decoded, box crops for the
input pipeline, pasted masks for evaluation.

Two resamplings, both bilinear with zero padding outside the source, both separable (a weight
matrix per axis, ``out = Wy @ mask @ Wx.T``):

- ``crop_mask`` (data pipeline): an image-size binary mask -> the ``M x M`` crop of its
  ground-truth box, sampled at the centres of an ``M x M`` grid over the box. Batches carry
  these box crops (``[G, M, M]`` uint8) instead of image-size masks, so the ground truth of a
  1344x800 image with 100 objects is 100 x 56 x 56 bytes, not 100 x 1344 x 800. The device side,
  ``cvolution_jax.detection.mask_head.mask_targets``, aligns them to the RoIs.
- ``paste_masks`` (evaluation): the ``28 x 28`` probabilities of each detection -> a binary mask
  of the original image, mmdet's ``_do_paste_mask`` (``grid_sample`` with ``align_corners=False``
  of the mask over its box) thresholded at ``>= 0.5``.

``segmentation_error`` says why a COCO ``segmentation`` cannot be a mask of its image (checked in
Python: pycocotools' C decoder writes past the mask on runs that overrun it), and
``decode_segmentation`` turns a valid one (polygons, uncompressed or compressed RLE) into a binary
mask with pycocotools, as ``COCO.annToMask`` does.

No jax here: grain's worker processes import this module when they unpickle the COCO
preprocessing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def bilinear_weights(positions: np.ndarray, size: int) -> np.ndarray:
    """``[n, size]`` float64 weights of bilinear samples at ``positions`` over ``size`` cells.

    Cell ``k``'s centre is at position ``k``; a sample at ``p`` reads cells ``floor(p)`` and
    ``floor(p) + 1`` with weights ``1 - frac`` and ``frac``, and cells outside ``[0, size)`` read
    0 (``grid_sample``'s ``padding_mode="zeros"``).
    """
    positions = np.asarray(positions, np.float64)
    low = np.floor(positions)
    frac = positions - low
    cells = np.arange(size)
    return (np.where(cells == low[:, None], 1.0 - frac[:, None], 0.0)
            + np.where(cells == low[:, None] + 1, frac[:, None], 0.0))


def _span(start: float, end: float, limit: int) -> tuple[int, int]:
    """Cells ``[lo, hi)`` of ``[0, limit)`` that samples taken within ``[start - 1, end + 1]`` can touch."""
    lo = min(max(int(math.floor(start)) - 1, 0), limit)
    return lo, max(min(int(math.ceil(end)) + 1, limit), lo)


def crop_mask(mask: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """The ``[size, size]`` float32 crop of binary ``mask [H, W]`` to ``box (x1, y1, x2, y2)``.

    Output cell ``(i, j)`` is the bilinear sample of ``mask`` at the centre of cell ``(i, j)`` of
    a ``size x size`` grid laid over the box (pixel ``(r, c)``'s centre is at ``(r + 0.5, c + 0.5)``),
    so ``crop_mask`` then ``mask_targets`` with the same box reproduces the mask's samples.
    """
    height, width = mask.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    grid = (np.arange(size) + 0.5) / size
    ys = y1 + grid * (y2 - y1) - 0.5  # sample positions in cell-centre units
    xs = x1 + grid * (x2 - x1) - 0.5
    r0, r1 = _span(ys[0], ys[-1], height)
    c0, c1 = _span(xs[0], xs[-1], width)
    region = mask[r0:r1, c0:c1].astype(np.float64)
    out = bilinear_weights(ys - r0, r1 - r0) @ region @ bilinear_weights(xs - c0, c1 - c0).T
    return out.astype(np.float32)


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
    """mmdet's mask pasting: ``[D, m, m]`` probabilities over ``boxes [D, 4]`` -> bool ``[D, height, width]``.

    Pixel ``(r, c)`` of detection ``d`` samples its mask at ``u = (c + 0.5 - x1) / (x2 - x1) * m - 0.5``
    (and likewise ``v`` for rows), bilinear with zeros outside the ``m x m`` mask, and is set when
    the sample is ``>= threshold``. With ``threshold >= 0.5`` no pixel more than one pixel outside
    the box can reach it, so only that window is computed (mmdet's ``skip_empty``).
    """
    masks = np.asarray(masks, np.float64)
    boxes = np.asarray(boxes, np.float64)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"paste_masks takes masks [D, m, m] and boxes [D, 4]; got {masks.shape} and {boxes.shape}.")
    if threshold < 0.5:
        raise ValueError(f"paste_masks: threshold must be >= 0.5 (mmdet's mask_thr_binary is 0.5); got {threshold}.")
    size = masks.shape[1]
    out = np.zeros((masks.shape[0], height, width), bool)
    for d, (mask, (x1, y1, x2, y2)) in enumerate(zip(masks, boxes)):
        r0, r1 = _span(y1, y2, height)
        c0, c1 = _span(x1, x2, width)
        if r1 == r0 or c1 == c0:
            continue
        # A degenerate box would divide by zero; torch's grid_sample then reads NaN -> nothing set.
        if x2 <= x1 or y2 <= y1:
            continue
        v = (np.arange(r0, r1) + 0.5 - y1) / (y2 - y1) * size - 0.5
        u = (np.arange(c0, c1) + 0.5 - x1) / (x2 - x1) * size - 0.5
        out[d, r0:r1, c0:c1] = bilinear_weights(v, size) @ mask @ bilinear_weights(u, size).T >= threshold
    return out


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` -> uint8 ``[height, width]`` binary mask (pycocotools, as ``annToMask``).

    Polygons (a list of ``[x0, y0, x1, y1, ...]``) and uncompressed RLE (``counts`` a list) are
    encoded at ``(height, width)`` first; compressed RLE is decoded as it is.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        rle = segmentation
    else:
        raise ValueError(
            f"segmentation must be polygons (a list of coordinate lists) or RLE (a dict with 'size' and "
            f"'counts'); got {str(segmentation)[:100]!r}.")
    return mask_utils.decode(rle)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def segmentation_error(segmentation: Any, height: int, width: int) -> str | None:
    """Why a COCO `segmentation` cannot be a mask of a `height` x `width` image; None if it can.

    Polygons: a non-empty list of polygons, each an even number (>= 6, three points) of finite
    coordinates. pycocotools raises on fewer points, or (for a first polygon of exactly 4
    numbers) silently reads a box. RLE: `size` equal to [height, width] and `counts` (a list of
    non-negative ints, or COCO's compressed string) whose runs cover exactly height * width
    pixels. Checked in Python, without pycocotools, because its C decoder writes past the mask
    when the runs add up to more than the image.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            return "segmentation is an empty list of polygons"
        for k, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                return f"polygon {k} is not a list of finite numbers"
            if len(polygon) < 6 or len(polygon) % 2:
                return (f"polygon {k} has {len(polygon)} coordinates; a polygon needs an even number, at least 6 "
                        f"(3 points)")
        return None
    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        return f"segmentation is neither polygons nor RLE (a dict with 'size' and 'counts'): {str(segmentation)[:60]!r}"
    size = segmentation["size"]
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        return f"RLE size {size!r} differs from the image's [height, width] [{height}, {width}]"
    counts = segmentation["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _compressed_rle_counts(counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts)
        if counts is None:
            return "RLE counts is not a valid compressed RLE string"
    elif not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        return "RLE counts must be a list of ints or a compressed RLE string"
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        return f"RLE runs cover {sum(counts)} pixels (or hold a negative run), not height * width = {height * width}"
    return None


def _compressed_rle_counts(text: str) -> list[int] | None:
    """The runs of COCO's compressed RLE string (pycocotools' `rleFrString`); None if malformed.

    Each run is a little-endian sequence of 5-bit groups, one per character (value + 48), with
    0x20 set on every group but the last and 0x10 of the last the sign; from the third run on a
    run is stored as the difference to the run two before.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                return None  # the string ends inside a run
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                return None
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts
