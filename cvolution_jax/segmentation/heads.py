"""mmseg's decode heads in NHWC: `FPNHead` (Semantic FPN), `UPerHead` (UPerNet) and `FCNHead`
(UPerNet's auxiliary head), with `ConvModule` (conv, BatchNorm, ReLU) as their building block.

Every head maps a list of feature maps `[B, h_i, w_i, C_i]` (finest first) to class logits
`[B, h_0, w_0, num_classes]` at the resolution of the finest map it reads (1/4 of the image
for FPNHead and UPerHead, 1/16 for the FCNHead on C4). mmseg's `cls_seg`, a 2-D dropout
(whole channels) then a 1x1 convolution with bias, ends each of them.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvolution_jax.layers import batch_norm, conv


def resize_bilinear(x, size: tuple[int, int]):
    """PyTorch's `F.interpolate(x, size, mode="bilinear", align_corners=False)` for NHWC `x [B, h, w, C]`.

    No antialiasing: torch's bilinear reads only the two neighbours also when shrinking.
    """
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


def adaptive_avg_pool(x, bins: int):
    """PyTorch's `AdaptiveAvgPool2d(bins)`: `[B, H, W, C] -> [B, bins, bins, C]`, bin `i` averaging
    rows `[floor(i H / bins), ceil((i + 1) H / bins))` (columns likewise)."""
    height, width = x.shape[1:3]
    edges = lambda n: [(i * n // bins, -(-(i + 1) * n // bins)) for i in range(bins)]  # noqa: E731
    rows = [jnp.stack([x[:, r0:r1, c0:c1].mean(axis=(1, 2)) for c0, c1 in edges(width)], axis=1)
            for r0, r1 in edges(height)]
    return jnp.stack(rows, axis=1)


class ConvModule(nn.Module):
    """mmcv's `ConvModule` with BatchNorm and ReLU: a KxK convolution without bias, BN, ReLU."""

    features: int
    kernel_size: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv(self.features, self.kernel_size, dtype=self.dtype, name="conv")(x)
        return nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(x))


class ClsSeg(nn.Module):
    """mmseg's `cls_seg`: `Dropout2d(dropout)` then a 1x1 convolution with bias to the classes.

    The classifier is initialised as mmseg does, `normal(0, 0.01)` and zero bias."""

    num_classes: int
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                         name="conv_seg")(x)
        return logits.astype(jnp.float32)


class FPNHead(nn.Module):
    """Semantic FPN's head (Kirillov et al.; mmseg's `FPNHead`): per level of stride `s`, max(1,
    log2(s / 4)) ConvModules of `channels`, each followed by a x2 bilinear upsampling while the level
    is coarser than 1/4; the branches are summed at 1/4 and classified.

    `[P2..P5] -> [B, h_2, w_2, num_classes]`.
    """

    num_classes: int
    channels: int = 128
    feature_strides: Sequence[int] = (4, 8, 16, 32)
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, levels, train: bool = False):
        output = None
        base = self.feature_strides[0]
        for i, (x, stride) in enumerate(zip(levels, self.feature_strides)):
            length = max(1, (stride // base).bit_length() - 1)
            for k in range(length):
                x = ConvModule(self.channels, 3, self.dtype, name=f"scale_heads_{i}_{k}")(x, train)
                if stride != base:
                    x = resize_bilinear(x, (x.shape[1] * 2, x.shape[2] * 2))
            # Odd image sizes make a coarse branch's doubled size miss the finest map by a pixel.
            output = x if output is None else output + resize_bilinear(x, output.shape[1:3])
        return ClsSeg(self.num_classes, self.dropout, self.dtype, name="cls_seg")(output, train)


class UPerHead(nn.Module):
    """UPerNet's head (Xiao et al.; mmseg's `UPerHead`): a pyramid pooling module on C5 (average
    pools to `pool_scales` bins, a 1x1 ConvModule each, upsampled and concatenated with C5, then a
    3x3 ConvModule), an FPN of `channels` over C2-C4 with 3x3 ConvModule outputs, all levels
    upsampled to 1/4, concatenated, fused by a 3x3 ConvModule and classified.

    `[C2..C5] -> [B, h_2, w_2, num_classes]`.
    """

    num_classes: int
    channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, stages, train: bool = False):
        module = lambda k, name: ConvModule(self.channels, k, self.dtype, name=name)  # noqa: E731
        top = stages[-1]
        pooled = [resize_bilinear(module(1, f"psp_{i}")(adaptive_avg_pool(top, s), train), top.shape[1:3])
                  for i, s in enumerate(self.pool_scales)]
        laterals = [module(1, f"lateral_{i}")(x, train) for i, x in enumerate(stages[:-1])]
        laterals.append(module(3, "bottleneck")(jnp.concatenate([top, *pooled], axis=-1), train))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
        outs = [module(3, f"fpn_{i}")(x, train) for i, x in enumerate(laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[1:3]
        fused = module(3, "fpn_bottleneck")(jnp.concatenate([resize_bilinear(x, size) for x in outs], axis=-1), train)
        return ClsSeg(self.num_classes, self.dropout, self.dtype, name="cls_seg")(fused, train)


class FCNHead(nn.Module):
    """mmseg's `FCNHead` as UPerNet's auxiliary head: `num_convs` 3x3 ConvModules of `channels` on
    one stage (`in_index`), no concatenation of the input, then classified."""

    num_classes: int
    channels: int = 256
    num_convs: int = 1
    in_index: int = 2
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, stages, train: bool = False):
        x = stages[self.in_index]
        for k in range(self.num_convs):
            x = ConvModule(self.channels, 3, self.dtype, name=f"convs_{k}")(x, train)
        return ClsSeg(self.num_classes, self.dropout, self.dtype, name="cls_seg")(x, train)
