"""The train state every task's step updates: parameters, optimizer state and BatchNorm statistics."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    batch_stats: Any = None


def train_state(model: nn.Module, tx: optax.GradientTransformation, variables: dict) -> TrainState:
    """The train state of `variables` (`params`, float32, and `batch_stats` if the model has BatchNorm),
    at step 0 with `tx`'s initial state: how every task starts (`loop.initial_state`), whatever
    input its `model.init` takes."""
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape, rng) -> TrainState:
    """`train_state` of a model that takes images: parameters and BatchNorm statistics initialised
    for `[1, *image_shape]` inputs."""
    return train_state(model, tx, model.init(rng, jnp.zeros((1, *image_shape), jnp.float32)))
