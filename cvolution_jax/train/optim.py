"""The one SGD every task trains with: `torch.optim.SGD` as the involution, CedNet and mmdetection
recipes run it. Each task passes its own learning-rate schedule and decay mask
(`cvolution_jax.tasks.classification`: warm-up + cosine, kernels only; `cvolution_jax.tasks.detection`:
mmdet's warm-up + step decay, every parameter)."""

from __future__ import annotations

from typing import Any, Callable

import optax


def sgd(learning_rate: optax.ScalarOrSchedule, *, momentum: float, weight_decay: float, nesterov: bool = False,
        decay_mask: Any | Callable[[Any], Any] = None, grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
    """SGD with (optionally Nesterov) momentum and PyTorch-style weight decay.

    Args:
      learning_rate: a number or a schedule of the step count.
      momentum, nesterov: torch's `momentum` and `nesterov`.
      weight_decay: `weight_decay x param` is added to the gradient before momentum, as
        `torch.optim.SGD(weight_decay=...)` does (not decoupled, as AdamW's).
      decay_mask: a tree of bools (or a function of the params giving one) marking the parameters
        decayed; None decays every parameter.
      grad_clip_norm: > 0 clips the global norm of the raw gradients first, before the decay is
        added (mmdet's `optimizer_config.grad_clip`); 0 leaves them as they are.
    """
    clip = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
    return optax.chain(
        *clip,
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
