"""Host-side instance-mask geometry (numpy): COCO segmentations in, box crops for the input
pipeline, pasted masks for evaluation.

Two resamplings, both bilinear with zero padding outside the source, both separable (a weight
matrix per axis, ``out = Wy @ mask @ Wx.T``):

- ``crop_mask`` (data pipeline): an image-size binary mask -> the ``M x M`` crop of its
  ground-truth box, sampled at the centres of an ``M x M`` grid over the box. Batches carry
  these box crops (``[G, M, M]`` uint8) instead of image-size masks, so the ground truth of a
  1344x800 image with 100 objects is 100 x 56 x 56 bytes, not 100 x 1344 x 800. The device side,
  ``cvolution_jax.detection.masks.mask_targets``, aligns them to the RoIs.
- ``paste_masks`` (evaluation): the ``28 x 28`` probabilities of each detection -> a binary mask
  of the original image, mmdet's ``_do_paste_mask`` (``grid_sample`` with ``align_corners=False``
  of the mask over its box) thresholded at ``>= 0.5``.

``decode_segmentation`` turns a COCO ``segmentation`` (polygons, uncompressed or compressed
RLE) into a binary mask with pycocotools, as ``COCO.annToMask`` does.

No jax here: grain's worker processes import this module when they unpickle the COCO
preprocessing.
"""

from __future__ import annotations

import math

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
