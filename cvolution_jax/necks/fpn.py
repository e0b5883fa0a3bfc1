"""The feature pyramid (FPN) neck of mmdet v2 (and of mmseg's Semantic FPN), with any output op.

Lin et al.'s FPN as mmdet v2's ``FPN(in_channels, 256, num_outs=5)`` builds it for Faster R-CNN:
a 1x1 lateral convolution per backbone stage C2-C5, a top-down pathway that adds each coarser
level, upsampled (nearest, to the finer level's size), to the finer lateral, a 3x3 output
convolution per level, and P6 as a stride-2 1x1 max pool of P5.

The C-volution paper's "neck" variants replace the four 3x3 output convolutions by involution or
C-volution (K=7); ``op`` selects ``conv`` (3x3, with bias as in mmdet), ``involution`` or
``cvolution``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cvolution_jax.layers import SpatialOp, conv, spatial_op


def upsample_nearest(x, size):
    """PyTorch's ``F.interpolate(x, size, mode="nearest")`` for NHWC ``x [B, h, w, C] -> [B, H, W, C]``.

    Output pixel ``i`` reads input pixel ``floor(i * h / H)``: with odd feature sizes (the
    ceil of halvings) the factor is not exactly 2, and this is the rule mmdet's FPN uses.
    """
    height, width = size
    rows = (jnp.arange(height) * x.shape[1]) // height
    cols = (jnp.arange(width) * x.shape[2]) // width
    return x[:, rows][:, :, cols]


class FPN(nn.Module):
    """``[C2, C3, C4, C5] -> [P2, P3, P4, P5, P6]``, every level with ``channels`` channels.

    Inputs are NHWC stage outputs at strides 4, 8, 16, 32; outputs are at strides 4-64, each
    ``[B, ceil(H / s), ceil(W / s), channels]`` for an ``[B, H, W, 3]`` image.

    Attributes:
      channels: output channels of every level (256 in mmdet).
      op: the output op of each level, a ``cvolution_jax.layers.SpatialOp`` of kind "conv"
        (3x3), "involution" or "cvolution" (K=7, the paper's).
      num_outs: levels returned (mmdet's ``num_outs``): 5 for the detectors (P2-P6), 4 for
        mmseg's Semantic FPN (P2-P5, no P6).
    """

    channels: int = 256
    op: SpatialOp = SpatialOp()
    dtype: Any = jnp.float32
    num_outs: int = 5

    @nn.compact
    def __call__(self, stages, train: bool = False):
        laterals = [
            conv(self.channels, 1, use_bias=True, dtype=self.dtype, name=f"lateral{i}")(c)
            for i, c in enumerate(stages)
        ]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + upsample_nearest(laterals[i], laterals[i - 1].shape[1:3])
        outs = [
            spatial_op(self.op, self.channels, name=f"output{i}", dtype=self.dtype, conv_bias=True)(lateral, train)
            for i, lateral in enumerate(laterals)
        ]
        # P6: mmdet's F.max_pool2d(P5, 1, stride=2), i.e. every other pixel (ceil(n / 2) of them).
        while len(outs) < self.num_outs:
            outs.append(outs[-1][:, ::2, ::2])
        return outs[:self.num_outs]
