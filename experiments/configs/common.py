"""Shared pieces of the configs: every field the training loop reads, and the ImageNet recipe."""

import ml_collections

from cvolution_jax import data

# Top-1 (%) after the recipe below, as published: the seed's model zoo (RedNet-38/50, CedNet-38/50)
# and involution's (RedNet-26/101/152); ResNet-50 is the seed's CedNet-50 minus its stated +2.0.
PUBLISHED_TOP1 = {
    "resnet50": 76.8,
    "rednet26": 75.96, "rednet38": 77.48, "rednet50": 78.35, "rednet101": 78.92, "rednet152": 79.12,
    "cednet38": 78.0, "cednet50": 78.83,
}


def base_config() -> ml_collections.ConfigDict:
    """Every field `cvolution_jax.train.loop` reads, with the ImageNet recipe's values."""
    config = ml_collections.ConfigDict()
    config.mode = "train"  # "train" (resumes from the latest checkpoint) or "eval"
    config.checkpoint_step = -1  # eval mode: the step to restore; -1 for the latest
    config.model = ml_collections.ConfigDict({"name": "cednet50", "overrides": {}})
    config.data = data.default_config()
    config.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
    config.seed = 0
    config.batch_size = 2048  # global, over all devices and processes
    config.num_epochs = 130.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.base_lr = 0.1  # per 256 images
    config.warmup_epochs = 5.0  # 3130 steps at batch 2048
    config.warmup_factor = 0.25  # warm-up starts at this fraction of the peak lr
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 1e-4  # kernels only; BatchNorm and biases are not decayed
    config.label_smoothing = 0.1
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1: once per epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the latest ones; the best by eval top-1 is kept too
    return config


def imagenet(model: str) -> ml_collections.ConfigDict:
    """ImageNet-1k with the involution recipe for registry model `model`."""
    config = base_config()
    config.model.name = model
    config.data.name = "imagenet"
    config.data.image_size = 224
    config.data.num_workers = 16
    config.expected_top1 = PUBLISHED_TOP1.get(model, -1.0)  # -1: no published number
    return config
