"""The Mask R-CNN mask head: mmdet v2's ``FCNMaskHead`` with its loss, and its test-time output.

RoIAlign 14x14 features of each RoI -> 4 layers of (op, ReLU) with 256 channels -> 2x2 stride-2
transposed convolution, ReLU -> 1x1 convolution to one 28x28 mask logit map per class. The op is
a 3x3 convolution (mmdet) or, in the C-volution paper's "head" variants, involution / C-volution
(K=7).

Training: the positive RoIs of the R-CNN sample (mmdet feeds only those to the mask head); each
RoI's target is its ground truth's mask aligned to the RoI (``masks.mask_targets``); the loss is
binary cross-entropy of the logits of the RoI's ground-truth class, averaged over the positive
RoIs' 28x28 pixels (mmdet's ``mask_cross_entropy``). Test: the sigmoid of the detected class's
map for each detection box.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import optax

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
