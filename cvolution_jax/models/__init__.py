"""The model registry: `create(name)` builds any network of the zoo by its name.

    model = cvolution_jax.models.create("cednet50", num_classes=1000, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images, train=False)
"""

from __future__ import annotations

import dataclasses
from typing import Any

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

# family -> (depths, ResNet fields)
FAMILIES = {
    "resnet": ((50, 101, 152), dict(op=SpatialOp("conv", kernel_size=3), stem="resnet")),
    "rednet": ((26, 38, 50, 101, 152), dict(op=SpatialOp("involution", kernel_size=7), stem="rednet")),
    "cednet": ((26, 38, 50, 101, 152), dict(op=SpatialOp("cvolution", kernel_size=7), stem="rednet")),
}

# The ResNet fields `create` takes as overrides (num_classes and dtype are its own arguments).
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(ResNet) if f.name not in ("parent", "name", "num_classes", "dtype"))


def names() -> list[str]:
    """Every registered model name, e.g. `resnet50`, `rednet26`, `cednet152`."""
    return [f"{family}{depth}" for family, (depths, _) in FAMILIES.items() for depth in depths]


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
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(
            f"Unknown ResNet field(s) {', '.join(unknown)} in the overrides of {name!r}; valid: {', '.join(OVERRIDABLE)}, "
            f"and op_kwargs for the op's switches.")
    for family, (depths, fields) in FAMILIES.items():
        suffix = name[len(family):]
        if name.startswith(family) and suffix.isdigit() and int(suffix) in depths:
            fields = {"stage_sizes": STAGE_SIZES[int(suffix)], **fields, **overrides}
            if op_kwargs and isinstance(fields["op"], SpatialOp):  # any other op fails ResNet's own check
                try:
                    fields["op"] = fields["op"].with_switches(op_kwargs)
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{name}: op_kwargs {op_kwargs!r}: {error}") from None
            return ResNet(num_classes=num_classes, dtype=dtype, **fields)
    raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(names())}.")


__all__ = ["Bottleneck", "ResNet", "STAGE_SIZES", "FAMILIES", "OVERRIDABLE", "names", "create"]
