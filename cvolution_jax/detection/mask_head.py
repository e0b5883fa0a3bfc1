"""The Mask R-CNN mask head: mmdet v2's ``FCNMaskHead`` with its loss, and its test-time output.

RoIAlign 14x14 features of each RoI -> 4 layers of (op, ReLU) with 256 channels -> 2x2 stride-2
transposed convolution, ReLU -> 1x1 convolution to one 28x28 mask logit map per class. The op is
a 3x3 convolution (mmdet) or, in the C-volution paper's "head" variants, involution / C-volution
(K=7).

Training: the positive RoIs of the R-CNN sample (mmdet feeds only those to the mask head); each
RoI's target is its ground truth's mask aligned to the RoI (``mask_targets``); the loss is
binary cross-entropy of the logits of the RoI's ground-truth class, averaged over the positive
RoIs' 28x28 pixels (mmdet's ``mask_cross_entropy``). Test: the sigmoid of the detected class's
map for each detection box.

``mask_targets`` is mmdet's ``mask_target``: the ``28 x 28`` target of each positive RoI is
RoIAlign (aligned, adaptive sampling) of its ground truth's mask over the RoI, binarised at 0.5.
mmdet aligns the image-size mask; here the box crop the input pipeline made
(``cvolution_jax.data.masks.crop_mask``) is aligned, with the RoI mapped into the crop's cells and
a zero border around the crop, which is the same up to the crop's resolution
(``config.data.mask_size``, 56 by default: two crop cells per target cell for an RoI the size of
its box). The host-side geometry (decoding, cropping, pasting) lives in ``cvolution_jax.data.masks``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cvolution_jax.detection.roi_align import roi_align
from cvolution_jax.layers import SpatialOp, he_normal, spatial_op


class MaskHead(nn.Module):
    """``[B, R, S, S, C]`` RoI features -> ``[B, R, 2S, 2S, num_classes]`` mask logits.

    Attributes:
      num_classes: object classes, background excluded.
      channels: width of the 4 layers and the upsampling (256); C must equal it for the ops.
      op: the 4 layers' op, a ``cvolution_jax.layers.SpatialOp`` of kind "conv" (3x3),
        "involution" or "cvolution" (K=7).
    """

    num_classes: int
    channels: int = 256
    op: SpatialOp = SpatialOp()
    num_convs: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        if self.op.kind != "conv" and features.shape[-1] != self.channels:
            raise ValueError(
                f"MaskHead: the {self.op.kind} op keeps its channels, so the RoI features must have channels="
                f"{self.channels}; got {features.shape[-1]}. Make the mask head as wide as the FPN "
                f"(config.model.mask_channels = config.model.channels).")
        batch, rois = features.shape[:2]
        x = features.reshape(batch * rois, *features.shape[2:])
        for i in range(self.num_convs):
            # mmcv's ConvModule: conv with bias (no norm), Kaiming-normal fan-out init, ReLU.
            x = nn.relu(spatial_op(self.op, self.channels, name=f"conv{i}", dtype=self.dtype, conv_bias=True)(x, train))
        x = nn.relu(nn.ConvTranspose(self.channels, (2, 2), strides=(2, 2), padding="VALID", kernel_init=he_normal,
                                     dtype=self.dtype, name="upsample")(x))
        logits = nn.Conv(self.num_classes, (1, 1), kernel_init=he_normal, dtype=self.dtype, name="conv_logits")(x)
        return logits.reshape(batch, rois, *logits.shape[1:]).astype(jnp.float32)


def class_maps(logits, labels):
    """The maps of ``labels [B, R]`` from ``logits [B, R, M, M, C]`` -> ``[B, R, M, M]``."""
    labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
    return jnp.take_along_axis(logits, labels[:, :, None, None, None], axis=-1)[..., 0]


def loss(logits, labels, targets, positive):
    """Binary cross-entropy of the ground-truth class's map, averaged over the positives' pixels.

    Args:
      logits: ``[B, R, M, M, C]``; labels: ``[B, R]`` ground-truth classes; targets: ``[B, R, M, M]``
        in {0, 1}; positive: ``[B, R]`` bool (RoI slots in use).
    """
    bce = optax.sigmoid_binary_cross_entropy(class_maps(logits, labels), targets).mean(axis=(2, 3))
    positive = positive.astype(jnp.float32)
    return (bce * positive).sum() / jnp.maximum(positive.sum(), 1.0)


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
