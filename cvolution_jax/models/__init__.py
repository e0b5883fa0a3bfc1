"""The model registry: `create(name)` builds any network of the zoo by its name.

    model = cvolution_jax.models.create("cednet50", num_classes=1000, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images, train=False)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol, runtime_checkable

import jax.numpy as jnp

from cvolution_jax.layers import SpatialOp
from cvolution_jax.models.resnet import Bottleneck, ResNet

STAGE_SIZES = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

# The ResNet fields `create` takes as overrides (num_classes and dtype are its own arguments).
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(ResNet) if f.name not in ("parent", "name", "num_classes", "dtype"))


@runtime_checkable
class Backbone(Protocol):
    """What a detector or segmentor needs of its backbone (the registry's ResNets all have it).

    `backbone(images [B, H, W, 3], train, return_stages=True)` returns the stage outputs C2-C5, the
    i-th `[B, H / stage_strides[i], W / stage_strides[i], stage_channels[i]]` (sizes rounded up);
    without `return_stages` it is a classifier. Its parameters are a classifier's minus the head,
    so an `experiments.imagenet` checkpoint initialises it (`cvolution_jax.tasks.backbone`).
    """

    stage_channels: tuple[int, ...]
    stage_strides: tuple[int, ...]

    def __call__(self, x, train: bool = False, return_stages: bool = False): ...


def _bottleneck_network(depth: int, **fields) -> ResNet:
    return ResNet(**{"stage_sizes": STAGE_SIZES[depth], **fields})


def resnet(depth: int, **fields) -> ResNet:
    """ResNet-`depth` (He et al. 2016, mmcls's ResNet-v1b): 3x3 convolutions, the 7x7 convolution stem."""
    return _bottleneck_network(depth, **{"op": SpatialOp("conv", kernel_size=3), "stem": "resnet", **fields})


def rednet(depth: int, **fields) -> ResNet:
    """RedNet-`depth` (Li et al. 2021): 7x7 involutions, the involution stem."""
    return _bottleneck_network(depth, **{"op": SpatialOp("involution", kernel_size=7), "stem": "rednet", **fields})


def cednet(depth: int, **fields) -> ResNet:
    """CedNet-`depth` (the C-volution paper): RedNet with 7x7 C-volutions."""
    return _bottleneck_network(depth, **{"op": SpatialOp("cvolution", kernel_size=7), "stem": "rednet", **fields})


# name -> constructor `(**fields) -> module`. A new network is its constructor and one line here.
MODELS: dict[str, Callable[..., ResNet]] = {
    **{f"resnet{depth}": functools.partial(resnet, depth) for depth in (50, 101, 152)},
    **{f"rednet{depth}": functools.partial(rednet, depth) for depth in (26, 38, 50, 101, 152)},
    **{f"cednet{depth}": functools.partial(cednet, depth) for depth in (26, 38, 50, 101, 152)},
}


def names() -> list[str]:
    """Every registered model name, e.g. `resnet50`, `rednet26`, `cednet152`."""
    return list(MODELS)


def create(name: str, *, num_classes: int = 1000, dtype: Any = jnp.float32, op_kwargs=(), **overrides) -> ResNet:
    """Builds the model `name` (see `names()`).

    Args:
      name: e.g. "resnet50", "rednet38", "cednet50".
      num_classes: classifier outputs.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
      op_kwargs: fields of the network's `SpatialOp` to change, (key, value) pairs or a dict, as a
        config holds them: `(("context", "none"), ("channel_branch", True))` for an ablation,
        `{"kernel_size": 5}`, `{"impl": "xla"}`.
      **overrides: other `ResNet` fields, e.g. `stage_sizes=(1, 1, 1), widths=(16, 32, 64)`.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(names())}.")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(
            f"Unknown ResNet field(s) {', '.join(unknown)} in the overrides of {name!r}; valid: {', '.join(OVERRIDABLE)}, "
            f"and op_kwargs for the op's switches.")
    model = MODELS[name](num_classes=num_classes, dtype=dtype, **overrides)
    if op_kwargs and isinstance(model.op, SpatialOp):  # any other op fails ResNet's own check
        try:
            model = model.clone(op=model.op.with_switches(op_kwargs))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}: op_kwargs {op_kwargs!r}: {error}") from None
    return model


__all__ = ["Backbone", "Bottleneck", "ResNet", "STAGE_SIZES", "OVERRIDABLE", "MODELS", "resnet", "rednet", "cednet", "names",
           "create"]
