"""Flax linen layers: the kernel generator, involution and C-volution.

Spec: `docs/cvolution.md` ("Involution", "C-volution"). All layers are NHWC and
take `train` to switch BatchNorm between batch statistics and running averages.

Parameter layout (so PyTorch involution / mmcls weights map one to one):

| here | involution PyTorch module |
|---|---|
| `generator/reduce_conv/kernel` `[1, 1, C, C/4]` | `conv1.conv.weight` `[C/4, C, 1, 1]` |
| `generator/reduce_bn/{scale,bias}`, stats `{mean,var}` | `conv1.bn.{weight,bias,running_mean,running_var}` |
| `generator/span_conv/{kernel,bias}` `[1, 1, C/4, G*K*K]` | `conv2.conv.{weight,bias}` |
| `generator/context_conv`, `generator/context_bn` | (C-volution only) |
| `static_kernel` `[K*K, C]` | (C-volution only) |

The generated channel `g*K*K + kh*K + kw` is tap `(kh, kw)` of group `g`, the reference's
`view(b, G, K*K, h, w)`.

`fuse_generator` on `Involution` and `CVolution` fuses the generator's last 1x1 conv into the
aggregation (`ops.fused_aggregate`; with the Pallas kernels, `kernels.fused`, `Hd` is recomputed
in registers, never stored), with the same `span_conv` parameters, so checkpoints work either
way. `impl` chooses the implementation for both paths, as for `ops.aggregate`. `None` (auto) will fuse where the fused
kernels are measured faster; none has been measured yet, so auto does not fuse anywhere for now.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cvolution_jax import ops

CONTEXTS = ("none", "dilated3x3")
REDUCTION = 4

# He-normal on fan_out for ReLU networks, as the involution and torchvision code initialise convs.
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel_size: int, stride: int = 1, *, dilation: int = 1, use_bias: bool = False, dtype: Any = jnp.float32, kernel_init=he_normal, name: str | None = None) -> nn.Conv:
    """A KxK NHWC convolution with PyTorch's symmetric padding `d*(K-1)/2`.

    Flax's "SAME" pads stride-2 inputs asymmetrically; explicit padding keeps the outputs (and
    imported PyTorch weights) identical to the reference networks.
    """
    pad = dilation * (kernel_size - 1) // 2
    return nn.Conv(
        features, (kernel_size, kernel_size), strides=stride, padding=((pad, pad), (pad, pad)),
        kernel_dilation=dilation, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name,
    )


def batch_norm(train: bool, *, dtype: Any = jnp.float32, zero_init: bool = False, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5).

    `zero_init` starts gamma at 0: the last BN of a residual branch, so each block starts as identity.
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones, name=name,
    )


def avg_pool_ceil(x, stride: int):
    """`[B, H, W, C] -> [B, ceil(H/s), ceil(W/s), C]`: window s, stride s, averaging real pixels only.

    The reference pools with floor-mode AvgPool(s, s) but aggregates over ceil(H/s) rows, so it
    only runs on sizes divisible by s; ceil mode equals it there and defines the odd sizes.
    """
    if stride == 1:
        return x
    b, h, w, c = x.shape
    ho, wo = -(-h // stride), -(-w // stride)
    pad = ((0, 0), (0, ho * stride - h), (0, wo * stride - w), (0, 0))
    sums = jnp.pad(x, pad).reshape(b, ho, stride, wo, stride, c).sum(axis=(2, 4))
    counts = jnp.pad(jnp.ones((1, h, w, 1), x.dtype), pad).reshape(1, ho, stride, wo, stride, 1).sum(axis=(2, 4))
    return sums / counts


class KernelGenerator(nn.Module):
    """Generates the dynamic kernel `Hd: [B, Ho, Wo, G, K*K]` from `x: [B, H, W, C]`.

    `x_s = AvgPool(s)(x)`, `u = ReLU(BN(Conv1x1(C -> C/4)(x_s)))`; with `context="dilated3x3"`
    (C-volution) `u = ReLU(BN(Conv3x3 dilation 2 (C/4 -> C/4)(u)))`, so each kernel sees a 5x5
    window; `Hd = Conv1x1(C/4 -> G*K*K, bias)(u)`.

    Called with `fused=True` it returns `(u, W2, b)` instead: the features `u: [B, Ho, Wo, C/4]`
    and span_conv's kernel `[C/4, G*K*K]` and bias `[G*K*K]`, for `kernels.fused`, which computes
    `Hd` itself. The parameters are the same either way.
    """

    channels: int
    kernel_size: int
    stride: int = 1
    context: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, *, fused: bool = False):
        if self.context not in CONTEXTS:
            raise ValueError(f"KernelGenerator: context must be one of {CONTEXTS}; got {self.context!r}.")
        reduced = self.channels // REDUCTION
        groups = self.channels // ops.GROUP_CHANNELS
        bn = functools.partial(batch_norm, train, dtype=self.dtype)
        u = avg_pool_ceil(x, self.stride)
        u = nn.relu(bn(name="reduce_bn")(conv(reduced, 1, dtype=self.dtype, name="reduce_conv")(u)))
        if self.context == "dilated3x3":
            u = nn.relu(bn(name="context_bn")(conv(reduced, 3, dilation=2, dtype=self.dtype, name="context_conv")(u)))
        span_conv = conv(groups * self.kernel_size**2, 1, use_bias=True, dtype=self.dtype, name="span_conv")
        if not fused:
            span = span_conv(u)
            return span.reshape(*span.shape[:3], groups, self.kernel_size**2)
        if self.is_initializing():
            span_conv(u)  # creates span_conv's parameters (and counts its MACs) as the unfused path does
        params = span_conv.variables["params"]
        # nn.Conv computes in `dtype`; so does the fused kernel with these casts.
        return u, params["kernel"].reshape(reduced, -1).astype(self.dtype), params["bias"].astype(self.dtype)


# The static kernel's initialisers. "fan_in" (the spec's): as a depthwise conv's, variance 1/(K*K);
# "zeros": C-volution starts as involution and the channel branch grows from there (an ablation).
STATIC_INITS = {"fan_in": nn.initializers.variance_scaling(1.0, "fan_in", "normal"), "zeros": nn.initializers.zeros}


def static_initializer(name: str):
    """The initialiser `STATIC_INITS[name]`, or a ValueError naming the choices."""
    if name not in STATIC_INITS:
        raise ValueError(f"static_init must be one of {', '.join(map(repr, STATIC_INITS))}; got {name!r}.")
    return STATIC_INITS[name]


class CVolution(nn.Module):
    """C-volution: `[B, H, W, C] -> [B, ceil(H/s), ceil(W/s), C]`.

    A dynamic spatial kernel from a larger context (`context="dilated3x3"`) plus a static
    per-channel kernel `S: [K*K, C]` (`channel_branch=True`), applied in one aggregation pass.
    With both switches off (`context="none", channel_branch=False`) it is involution: see
    `Involution`.
    """

    channels: int
    kernel_size: int = 7
    stride: int = 1
    context: str = "dilated3x3"
    channel_branch: bool = True
    static_init: str = "fan_in"  # S's initialiser, a key of STATIC_INITS
    dilation: int = 1
    dtype: Any = jnp.float32
    impl: str = "auto"
    fuse_generator: bool | None = None  # see the module docstring; None (auto): unfused until measured

    @nn.compact
    def __call__(self, x, train: bool = False):
        # Auto (None) is meant to fuse where the fused kernels are measured faster; none has been run on
        # a GPU yet, so only an explicit True fuses for now.
        fused = bool(self.fuse_generator)
        generator = KernelGenerator(self.channels, self.kernel_size, self.stride, self.context, dtype=self.dtype, name="generator")
        generated = generator(x, train, fused=fused)
        static = None
        if self.channel_branch:
            static = self.param("static_kernel", static_initializer(self.static_init), (self.kernel_size**2, self.channels))
        config = dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation)
        if not fused:
            return ops.aggregate(x, generated, static, **config, impl=self.impl)
        features, span_kernel, span_bias = generated
        return ops.fused_aggregate(x, features, span_kernel, span_bias, static, **config, impl=self.impl)


class Involution(CVolution):
    """Involution (Li et al., CVPR 2021): `CVolution` with both switches off, by default.

    `Involution(channels, kernel_size, stride)`, `[B, H, W, C] -> [B, ceil(H/s), ceil(W/s), C]`.
    Only the defaults differ, so the fields, the parameters (no `context_*`, no `static_kernel`)
    and the computation are `CVolution`'s; being a class rather than a partial keeps the
    automatic module name `Involution_N` of earlier checkpoints and `isinstance` checks.
    """

    context: str = "none"
    channel_branch: bool = False


SPATIAL_OPS = ("conv", "involution", "cvolution")


@dataclasses.dataclass(frozen=True)
class SpatialOp:
    """Which spatial op a network runs and how: hashable, so modules take it as one field.

    Attributes:
      kind: "conv" (a KxK convolution), "involution" or "cvolution".
      kernel_size: K, an odd int; None means the networks' choice, 3 for a convolution and 7 for
        involution and C-volution.
      context, channel_branch: C-volution's switches (its ablations); `kind="involution"` turns
        both off whatever they say.
      static_init: the static kernel's initialiser, a key of `STATIC_INITS` (C-volution with the
        channel branch only).
      impl, fuse_generator: the aggregation's implementation (`ops.aggregate`) and whether the
        generator's span conv is fused into it (`kernels.fused`).

    A convolution ignores the last five. Configs hold an op as plain data, its kind and its
    switches as (key, value) pairs; `SpatialOp.named` is where they become one.
    """

    kind: str = "conv"
    kernel_size: int | None = None
    context: str = "dilated3x3"
    channel_branch: bool = True
    static_init: str = "fan_in"
    impl: str = "auto"
    fuse_generator: bool | None = None

    def __post_init__(self):
        if self.kind not in SPATIAL_OPS:
            raise ValueError(f"spatial op must be one of {SPATIAL_OPS}; got {self.kind!r}.")
        static_initializer(self.static_init)  # a bad name fails here, where the config is read
        if self.kernel_size is None:
            object.__setattr__(self, "kernel_size", 3 if self.kind == "conv" else 7)
        k = self.kernel_size
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1 or k % 2 == 0:
            raise ValueError(
                f"spatial op kernel_size must be an odd int >= 1 (3 for conv, 7 for involution and C-volution); got {k!r}.")

    @classmethod
    def named(cls, kind: str, op_kwargs=()) -> SpatialOp:
        """The op a config names: `kind` with the fields of `op_kwargs`, (key, value) pairs or a
        dict, e.g. `SpatialOp.named("cvolution", (("context", "none"),))`."""
        return cls(kind).with_switches(op_kwargs)

    def with_switches(self, op_kwargs) -> SpatialOp:
        """This op with the fields of `op_kwargs` ((key, value) pairs or a dict; any field but
        `kind`) changed."""
        switches = dict(op_kwargs)
        valid = [f.name for f in dataclasses.fields(self) if f.name != "kind"]
        unknown = sorted(set(switches) - set(valid))
        if unknown:
            raise ValueError(f"Unknown spatial op switch(es) {', '.join(unknown)} in op_kwargs; valid: {', '.join(valid)}.")
        return dataclasses.replace(self, **switches)


def spatial_op(op: SpatialOp, channels: int, stride: int = 1, *, name: str, dtype: Any = jnp.float32, conv_bias: bool = False, conv_init=he_normal):
    """The spatial op `op` of a network as a layer `(x, train) -> y` (call inside a compact method).

    A convolution has `channels` outputs (`conv_bias`, `conv_init`: its bias and kernel
    initialiser, e.g. for mmdet's FPN and RPN layers); involution and C-volution keep the channel
    count. `op` is a `SpatialOp`, never a kind alone, which would lose its switches (`impl`,
    `kernel_size`, a config's `op_kwargs`): `SpatialOp.named(kind, op_kwargs)` builds one from a config.
    """
    if not isinstance(op, SpatialOp):
        raise TypeError(f"op must be a cvolution_jax.layers.SpatialOp, e.g. SpatialOp({op!r}); got {op!r}. A kind alone would "
                        f"drop the op's switches: SpatialOp.named(kind, config.model.op_kwargs) builds one from a config.")
    if op.kind == "conv":
        layer = conv(channels, op.kernel_size, stride, use_bias=conv_bias, kernel_init=conv_init, dtype=dtype, name=name)
        return lambda x, train: layer(x)
    if op.kind == "involution":
        return Involution(channels, op.kernel_size, stride, dtype=dtype, impl=op.impl, fuse_generator=op.fuse_generator, name=name)
    return CVolution(
        channels, op.kernel_size, stride, context=op.context, channel_branch=op.channel_branch, static_init=op.static_init,
        dtype=dtype, impl=op.impl, fuse_generator=op.fuse_generator, name=name,
    )
