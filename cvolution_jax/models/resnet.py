"""ResNet, RedNet and CedNet: one bottleneck network parametrised by its spatial op.

Spec: `docs/cvolution.md` ("Networks"). NHWC input `[B, H, W, 3]`, logits
`[B, num_classes]` in float32 whatever the compute dtype; parameters are always float32.

Module names follow mmcls (`layer3_5/conv2` is `layer3.5.conv2`) so PyTorch weights map by name.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cvolution_jax import ops
from cvolution_jax.layers import SPATIAL_OPS, SpatialOp, batch_norm, conv, spatial_op

EXPANSION = 4
STEMS = ("resnet", "rednet", "small")


class Bottleneck(nn.Module):
    """conv1x1 -> op(K, stride) -> conv1x1 (x4), each followed by BN; ReLU after the residual add.

    `[B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), 4*width]`. The op is a 3x3 convolution in
    ResNet, a 7x7 involution in RedNet and a 7x7 C-volution in CedNet (`op`, a `SpatialOp`).
    """

    width: int
    stride: int = 1
    op: SpatialOp = SpatialOp()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(batch_norm, train, dtype=self.dtype)
        y = nn.relu(bn(name="bn1")(conv(self.width, 1, dtype=self.dtype, name="conv1")(x)))
        op = spatial_op(self.op, self.width, self.stride, name="conv2", dtype=self.dtype)
        y = nn.relu(bn(name="bn2")(op(y, train)))
        y = bn(zero_init=True, name="bn3")(conv(self.width * EXPANSION, 1, dtype=self.dtype, name="conv3")(y))
        if x.shape[-1] != self.width * EXPANSION or self.stride != 1:
            x = conv(self.width * EXPANSION, 1, self.stride, dtype=self.dtype, name="downsample_conv")(x)
            x = bn(name="downsample_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A bottleneck network: stem, four stages, global average pool, dense classifier.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for depth 50.
      op: the spatial op of the bottlenecks (and, at K=3, of the RedNet stem), a
        `cvolution_jax.layers.SpatialOp`: `SpatialOp("conv")` (3x3), `SpatialOp("involution")`
        or `SpatialOp("cvolution", context="none")` (K=7).
      stem: "resnet" (conv7x7 s2, maxpool), "rednet" (conv3x3 s2, op(K=3), conv3x3, maxpool) or
        "small", the RedNet stem without its max pool (one downsampling instead of two), for
        32x32-class inputs.
      widths: bottleneck widths m per stage; stage outputs are 4m.
      stem_width: output channels of the stem.
    """

    stage_sizes: Sequence[int]
    op: SpatialOp = SpatialOp()
    stem: str = "resnet"
    num_classes: int = 1000
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    dtype: Any = jnp.float32

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of the stage outputs C2-C5 (`return_stages`): 4x each stage's width."""
        return tuple(EXPANSION * w for w in self.widths)

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """Strides of the stage outputs: 4, 8, 16, 32 after the resnet and rednet stems (stride 4),
        2, 4, 8, 16 after the small one (stride 2)."""
        stem_stride = 2 if self.stem == "small" else 4
        return tuple(stem_stride * 2 ** i for i in range(len(self.stage_sizes)))

    def __post_init__(self):
        # At construction, so a bad field fails before any tracing or compilation, naming itself.
        check_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False, return_stages: bool = False):
        """`[B, H, W, 3] -> [B, num_classes]` logits (float32).

        With `return_stages`, returns instead the four stage outputs C2-C5 (strides 4, 8, 16, 32
        for the resnet and rednet stems), a detector's backbone features; `fc` is then never
        created, so a detector's backbone parameters are the classifier's minus `fc`.
        """
        bn = functools.partial(batch_norm, train, dtype=self.dtype)
        x = x.astype(self.dtype)
        if self.stem == "resnet":
            x = nn.relu(bn(name="stem_bn1")(conv(self.stem_width, 7, 2, dtype=self.dtype, name="stem_conv1")(x)))
        else:
            half = self.stem_width // 2
            x = nn.relu(bn(name="stem_bn1")(conv(half, 3, 2, dtype=self.dtype, name="stem_conv1")(x)))
            # The RedNet stem's op is 3x3 whatever the bottlenecks' K, as in the reference network.
            op = spatial_op(dataclasses.replace(self.op, kernel_size=3), half, name="stem_op", dtype=self.dtype)
            x = nn.relu(bn(name="stem_bn2")(op(x, train)))
            x = nn.relu(bn(name="stem_bn3")(conv(self.stem_width, 3, dtype=self.dtype, name="stem_conv2")(x)))
        if self.stem != "small":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = []
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(width, stride, self.op, self.dtype, name=f"layer{stage + 1}_{block}")(x, train)
            stages.append(x)
        if return_stages:
            return tuple(stages)
        x = x.mean(axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01), name="fc")(x)
        return x.astype(jnp.float32)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_fields(model: ResNet) -> None:
    """Raises ValueError naming the first field of `model` that cannot build its network.

    `zip(stage_sizes, widths)` would silently drop the stages one of them lacks; an involution or
    C-volution shares one kernel among 16 channels, so its widths must be multiples of 16, and
    the rednet and small stems run their op on `stem_width / 2` channels.
    """
    if model.stem not in STEMS:
        raise ValueError(f"ResNet: stem must be one of {STEMS}; got {model.stem!r}.")
    if not isinstance(model.op, SpatialOp):
        raise ValueError(
            f"ResNet: op must be a cvolution_jax.layers.SpatialOp of kind {SPATIAL_OPS}, e.g. SpatialOp('involution'); "
            f"got {model.op!r}.")
    kind = model.op.kind
    stage_sizes, widths = tuple(model.stage_sizes), tuple(model.widths)
    if not stage_sizes or not all(_is_int(n) and n >= 1 for n in stage_sizes):
        raise ValueError(f"ResNet: stage_sizes must be one or more block counts >= 1, e.g. (3, 4, 6, 3); got {stage_sizes}.")
    if len(widths) != len(stage_sizes):
        raise ValueError(
            f"ResNet: {len(stage_sizes)} stages in stage_sizes {stage_sizes} but {len(widths)} in widths {widths}; "
            f"give one width per stage."
        )
    if not _is_int(model.num_classes) or model.num_classes < 1:
        raise ValueError(f"ResNet: num_classes must be an int >= 1; got {model.num_classes!r}.")
    if kind == "conv":
        if not all(_is_int(w) and w >= 1 for w in widths):
            raise ValueError(f"ResNet: widths must be ints >= 1; got {widths}.")
        stem_multiple, stem_minimum = 1, 1 if model.stem == "resnet" else 2  # the rednet stems halve stem_width
    else:
        group = ops.GROUP_CHANNELS
        if not all(_is_int(w) and w >= group and w % group == 0 for w in widths):
            raise ValueError(
                f"ResNet: widths must be multiples of {group} with op={kind!r} (one kernel per {group} channels); "
                f"got {widths}."
            )
        stem_multiple = stem_minimum = 1 if model.stem == "resnet" else 2 * group
    if not _is_int(model.stem_width) or model.stem_width < stem_minimum or model.stem_width % stem_multiple:
        need = f"a multiple of {stem_multiple}" if stem_multiple > 1 else f"an int >= {stem_minimum}"
        why = f": the {model.stem!r} stem's first conv and op have stem_width / 2 channels" if model.stem != "resnet" else ""
        raise ValueError(f"ResNet: stem_width must be {need} with op={kind!r}, stem={model.stem!r}{why}; got {model.stem_width!r}.")
