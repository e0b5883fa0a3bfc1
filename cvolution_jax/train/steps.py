"""The train state every task's step updates: parameters, optimizer state and BatchNorm statistics."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    batch_stats: Any = None


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape, rng) -> TrainState:
    """Initialises parameters (float32) and BatchNorm statistics for `[1, *image_shape]` inputs."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"])
