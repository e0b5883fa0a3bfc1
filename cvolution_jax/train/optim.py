"""The involution / CedNet ImageNet optimizer: SGD with Nesterov momentum, linear warm-up then
cosine decay to 0, and PyTorch-style weight decay (added to the gradient) on kernels only."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """`config.base_lr` per 256 images, scaled to the global batch; warm-up over
    `config.warmup_epochs` from `config.warmup_factor` x lr, then cosine to 0 at `total_steps`."""
    peak = config.base_lr * config.batch_size / 256
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=config.warmup_factor * peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0,
    )


def decay_mask(params):
    """True for convolution and dense kernels and for C-volution's static kernel (ndim >= 2);
    False for BatchNorm scales/offsets and biases, which the recipe leaves undecayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(config, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
    # Weight decay enters the gradient before momentum, as torch.optim.SGD(weight_decay=...) does.
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate_schedule(config, steps_per_epoch, total_steps), momentum=config.momentum, nesterov=config.nesterov),
    )
