"""Image classification as a task of the runner: a registry model, `cvolution_jax.data`'s splits,
the involution / CedNet ImageNet optimizer (`create_optimizer`), label-smoothed cross-entropy
(`train_step`) and top-1 / top-5 over the eval split (`eval_step`).

Batches are dicts: `image [B, H, W, C]` float32, `label [B]` int32, `valid [B]` float32 (0 for
padding and skipped images). Under `jax.jit` with the batch sharded over a mesh's `data` axis,
BatchNorm's batch mean and variance are reductions over the global batch, so statistics are
averaged across all devices without an explicit `pmean`.

    loop.train_and_evaluate(Classification(), config, workdir)    # experiments/imagenet.py
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from cvolution_jax import data, models
from cvolution_jax.data import registry
from cvolution_jax.tasks.backbone import check_backbone
from cvolution_jax.train import config_checks, optim, steps
from cvolution_jax.train.loop import (DataMesh, Run, check_eval_coverage, compute_dtype, initial_state, report,
                                      schedule_length)
from cvolution_jax.train.metrics import CLASSIFICATION_SCORES

log = logging.getLogger(__name__)


def create_model(config: ml_collections.ConfigDict, num_classes: int):
    """The model of `config.model` (`name` from the registry plus `overrides` of its fields)."""
    overrides = dict(config.model.get("overrides", {}))
    return models.create(config.model.name, num_classes=num_classes, dtype=compute_dtype(config), **overrides)


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


def static_kernel_mask(params):
    """True for C-volution's static kernels `S` (parameters named `static_kernel`), False elsewhere."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "static_kernel", params)


def create_optimizer(config, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
    """The involution / CedNet ImageNet optimizer: SGD (`config.momentum`, `config.nesterov`) on
    `learning_rate_schedule`, weight decay `config.weight_decay` on kernels only (`decay_mask`);
    C-volution's static kernels step `config.static_kernel_lr_mult` times as far (mmcv's `lr_mult`)."""
    tx = optim.sgd(learning_rate_schedule(config, steps_per_epoch, total_steps), momentum=config.momentum,
                   nesterov=config.nesterov, weight_decay=config.weight_decay, decay_mask=decay_mask)
    if config.static_kernel_lr_mult == 1.0:
        return tx
    # Scaling the final SGD step is scaling the learning rate: momentum and decay are linear in it.
    return optax.chain(tx, optax.masked(optax.scale(config.static_kernel_lr_mult), static_kernel_mask))


def check_classification(config: ml_collections.ConfigDict, workdir: str, *, train: bool) -> None:
    """Every field the classification task (`cvolution_jax.tasks.classification`) reads before it builds
    anything, then the workdir."""
    registry.get("classification", config.data.name, error=config_checks.ConfigError)
    config_checks.check_int(config, "data.image_size", 1, " (images are resized to image_size x image_size)")
    config_checks.check_int(config, "data.validation_size", 0, " (Fashion-MNIST's training images held out; 0: the test set)")
    check_backbone(config, "model.name", "model.overrides")
    config_checks.check_run(config, workdir, train=train)


def weighted_cross_entropy(logits, labels, valid, label_smoothing: float):
    """Mean label-smoothed cross-entropy over the examples with valid 1. `logits [B, N]`, `valid [B]`."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    return (losses * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def train_step(state: steps.TrainState, batch, label_smoothing: float):
    """One SGD step. Returns the new state and `{"loss", "top1", "examples", "param_norm"}`.

    `param_norm` is the global norm of the updated parameters: finite loss with non-finite
    parameters is the first sign of divergence, and a checkpoint must not be written then.
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
        )
        return weighted_cross_entropy(logits, batch["label"], batch["valid"], label_smoothing), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    correct = (logits.argmax(-1) == batch["label"]) * batch["valid"]
    metrics = {
        "loss": loss,
        "top1": correct.sum() / jnp.maximum(batch["valid"].sum(), 1.0),
        "examples": batch["valid"].sum(),
        "param_norm": optax.tree.norm(state.params),
    }
    return state, metrics


def eval_step(state: steps.TrainState, batch):
    """Sums over the real examples of a batch: `{"loss", "top1", "top5", "examples"}`."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    valid = batch["valid"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": (losses * valid).sum(),
        "top1": ((logits.argmax(-1) == batch["label"]) * valid).sum(),
        "top5": ((top5 == batch["label"][:, None]).any(-1) * valid).sum(),
        "examples": valid.sum(),
    }


def run_eval(state, eval_split: data.Split, mesh: DataMesh, eval_fn) -> dict:
    """Top-1, top-5 and loss over the whole eval split (every example exactly once).

    An image that failed to decode is left out (its valid is 0) and counted, as in training, so one
    damaged validation file never stops a run. Returns `{"loss", "top1", "top5"}` averaged over
    the `images` evaluated, plus `images` and `skipped_images` (the split's size is their sum).
    """
    totals, corrupt = None, 0
    for batch in eval_split.dataset:
        corrupt += int(np.sum(batch["corrupt"]))
        sums = eval_fn(state, mesh.shard(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    if jax.process_count() > 1:  # each process counted the failures of its own shard
        corrupt = int(np.sum(multihost_utils.process_allgather(np.int64(corrupt))))
    evaluated = round(float(totals["examples"]))
    check_eval_coverage(evaluated, corrupt, eval_split.num_examples, split="the eval split",
                        advice="check config.data.data_dir and the validation files.")
    metrics = {key: float(totals[key]) / evaluated for key in ("loss", "top1", "top5")}
    return {**metrics, "images": evaluated, "skipped_images": corrupt}


@dataclasses.dataclass(frozen=True)
class Classification:
    """The classification task: `build` makes the splits, the model, its optimizer and state."""

    name: ClassVar[str] = "classification"
    entry_point: ClassVar[str] = "experiments.imagenet"
    best_metric: str = "top1"
    curves: dict = dataclasses.field(default_factory=lambda: {"scores": CLASSIFICATION_SCORES})

    def create_model(self, config: ml_collections.ConfigDict, num_classes: int):
        return create_model(config, num_classes)

    def num_classes(self, config: ml_collections.ConfigDict, variables: dict) -> int:
        """The classes of a trained model's `variables`: its classifier's outputs."""
        return int(variables["params"]["fc"]["bias"].shape[0])

    def preprocess_image(self, config: ml_collections.ConfigDict, image) -> tuple[np.ndarray, np.ndarray]:
        """`(inputs [1, H, W, C] float32, display [H, W, 3] uint8)`: a PIL image as the eval split sees its images."""
        return data.preprocess_image(config.data, image)

    def inference_kwargs(self) -> dict:
        """`model.apply`'s keyword arguments that run every layer on an image batch, at inference."""
        return {"train": False}

    def check_config(self, config: ml_collections.ConfigDict, workdir: str, *, train: bool) -> None:
        check_classification(config, workdir, train=train)

    def build(self, config: ml_collections.ConfigDict, workdir: str, mesh: DataMesh, *, train: bool) -> Run:
        del workdir  # the datasets are read from config.data
        split = functools.partial(data.create_split, config.data, batch_size=mesh.per_process, seed=config.seed)
        train_split = split(train=True) if train else None
        eval_split = split(train=False)
        if train:
            steps_per_epoch, total_steps = schedule_length(config, train_split.num_examples)
        else:
            # The schedule's lengths are no part of the state a checkpoint is restored into.
            steps_per_epoch, total_steps = 1, 1
        model = create_model(config, eval_split.num_classes)
        tx = create_optimizer(config, steps_per_epoch, total_steps)
        images = jnp.zeros((1, *eval_split.image_shape), jnp.float32)
        state = initial_state(model, tx, jax.jit(model.init)(jax.random.key(config.seed), images), mesh)
        eval_fn = jax.jit(eval_step)
        if not train:
            def evaluate(state, step):
                metrics = run_eval(state, eval_split, mesh, eval_fn)
                report(f"checkpoint step {step}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  "
                       f"loss {metrics['loss']:.4f}  ({metrics['images']} images)")
                return metrics

            return Run(state=state, evaluate=evaluate)

        train_fn = jax.jit(functools.partial(train_step, label_smoothing=config.label_smoothing), donate_argnums=0)
        skipped = 0

        def step_fn(state, batch, step):
            nonlocal skipped
            corrupt = int(np.sum(batch.get("corrupt", 0)))
            if corrupt:
                skipped += corrupt
                log.warning("%d corrupt images skipped so far.", skipped)
            return train_fn(state, mesh.shard(batch))

        def evaluate(state, step):
            metrics = run_eval(state, eval_split, mesh, eval_fn)
            report(f"step {step}: eval top-1 {metrics['top1']:.4f} top-5 {metrics['top5']:.4f} loss {metrics['loss']:.4f}")
            return metrics

        return Run(state=state, evaluate=evaluate, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                   train_iter=iter(train_split.dataset), step_fn=step_fn,
                   learning_rate=learning_rate_schedule(config, steps_per_epoch, total_steps))
