"""Mask R-CNN's training targets on the device (jnp): ``mask_targets``.

``mask_targets`` is mmdet's ``mask_target``: the ``28 x 28`` target of each positive RoI is
RoIAlign (aligned, adaptive sampling) of its ground truth's mask over the RoI, binarised at 0.5.
mmdet aligns the image-size mask; here the box crop the input pipeline made
(``cvolution_jax.data.masks.crop_mask``) is aligned, with the RoI mapped into the crop's cells and
a zero border around the crop, which is the same up to the crop's resolution
(``config.data.mask_size``, 56 by default: two crop cells per target cell for an RoI the size of
its box). The host-side geometry (decoding, cropping, pasting) lives in ``cvolution_jax.data.masks``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cvolution_jax.detection.roi_align import roi_align


def mask_targets(rois, gt_boxes, gt_crops, size: int = 28):
    """mmdet's ``mask_target`` for RoIs of one image, from box crops.

    Args:
      rois: ``[R, 4]`` RoIs in image pixels.
      gt_boxes: ``[R, 4]`` the box of each RoI's ground truth (the box ``gt_crops`` was cut to).
      gt_crops: ``[R, M, M]`` each RoI's ground-truth mask cropped to its box (``crop_mask``).
      size: static target size (28).

    Returns:
      ``[R, size, size]`` float32 in {0, 1}: RoIAlign (aligned, adaptive sampling) of the mask
      over the RoI, ``>= 0.5``. No gradient.
    """
    crop_size = gt_crops.shape[-1]
    gw = jnp.maximum(gt_boxes[:, 2] - gt_boxes[:, 0], 1e-6)
    gh = jnp.maximum(gt_boxes[:, 3] - gt_boxes[:, 1], 1e-6)
    # The RoI in the padded crop's pixels: crop cell j covers [j, j + 1] of the box's M units and
    # sits at index j + 1 after the zero border, so x -> (x - gx1) * M / gw + 1.
    scale = jnp.stack([crop_size / gw, crop_size / gh] * 2, axis=-1)
    crop_rois = (rois - jnp.concatenate([gt_boxes[:, :2]] * 2, axis=-1)) * scale + 1.0
    padded = jnp.pad(gt_crops.astype(jnp.float32), ((0, 0), (1, 1), (1, 1)))[..., None]
    one = lambda crop, roi: roi_align(crop, roi[None], size, 1.0)[0, ..., 0]  # noqa: E731
    aligned = jax.vmap(one)(padded, crop_rois)
    return jax.lax.stop_gradient((aligned >= 0.5).astype(jnp.float32))
