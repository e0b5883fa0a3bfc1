"""Train state and the jitted train / eval steps of image classification.

Batches are dicts: `image [B, H, W, C]` float32, `label [B]` int32, `mask [B]` float32 (0 for
padding and skipped images). Under `jax.jit` with the batch sharded over a mesh's `data` axis,
BatchNorm's batch mean and variance are reductions over the global batch, so statistics are
averaged across all devices without an explicit `pmean`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    batch_stats: Any = None


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape, rng) -> TrainState:
    """Initialises parameters (float32) and BatchNorm statistics for `[1, *image_shape]` inputs."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"])


def weighted_cross_entropy(logits, labels, mask, label_smoothing: float):
    """Mean label-smoothed cross-entropy over the examples with mask 1. `logits [B, N]`."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def train_step(state: TrainState, batch, label_smoothing: float):
    """One SGD step. Returns the new state and `{"loss", "top1", "examples", "param_norm"}`.

    `param_norm` is the global norm of the updated parameters: finite loss with non-finite
    parameters is the first sign of divergence, and a checkpoint must not be written then.
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
        )
        return weighted_cross_entropy(logits, batch["label"], batch["mask"], label_smoothing), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    correct = (logits.argmax(-1) == batch["label"]) * batch["mask"]
    metrics = {
        "loss": loss,
        "top1": correct.sum() / jnp.maximum(batch["mask"].sum(), 1.0),
        "examples": batch["mask"].sum(),
        "param_norm": optax.tree.norm(state.params),
    }
    return state, metrics


def eval_step(state: TrainState, batch):
    """Sums over the real examples of a batch: `{"loss", "top1", "top5", "examples"}`."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": (losses * mask).sum(),
        "top1": ((logits.argmax(-1) == batch["label"]) * mask).sum(),
        "top5": ((top5 == batch["label"][:, None]).any(-1) * mask).sum(),
        "examples": mask.sum(),
    }
