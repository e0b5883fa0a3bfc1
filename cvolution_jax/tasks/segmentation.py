"""Semantic segmentation as a task of the runner: mmseg's Semantic FPN or UPerNet
(`cvolution_jax.segmentation`), `cvolution_jax.data.registry`'s segmentation datasets made examples
by `cvolution_jax.data.semantic`, mmseg's cross-entropy, SGD with poly decay, and mIoU / mAcc / aAcc
from one confusion matrix over the eval set.

    loop.train_and_evaluate(Segmentation(vis=8), config, workdir)    # experiments/cityscapes.py

Batches are dicts: `image [B, h, w, 3]` float32, `label [B, H, W]` uint8 (255 ignored),
`image_size [B, 2]`, `valid [B]`. The eval step sums the confusion matrix over the global batch
inside `jax.jit`, so every process holds the same totals without a gather.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from cvolution_jax import models, ops
from cvolution_jax.data import pipeline, registry, semantic
from cvolution_jax.data.semantic_records import SemanticSet
from cvolution_jax.necks.fpn import FPN
from cvolution_jax.layers import SpatialOp
from cvolution_jax.segmentation import metrics as seg_metrics
from cvolution_jax.segmentation import visualize
from cvolution_jax.segmentation.encoder_decoder import EncoderDecoder, init_variables
from cvolution_jax.segmentation.heads import FCNHead, FPNHead, UPerHead
from cvolution_jax.tasks.backbone import check_backbone, check_pretrained, load_pretrained
from cvolution_jax.train import config_checks, optim, steps
from cvolution_jax.train.loop import (DataMesh, Run, check_eval_coverage, compute_dtype, initial_state, report,
                                      schedule_length)

log = logging.getLogger(__name__)

DECODE_HEADS = ("fpn", "uper")
TRAIN_LABELS_CHECKED = 64  # train label maps read before training (all of the val split's are)
CURVES = (("train", "decode", "train decode loss"), ("eval", "mIoU", "eval mIoU"), ("eval", "aAcc", "eval aAcc"))


def create_model(config: ml_collections.ConfigDict, num_classes: int | None = None) -> EncoderDecoder:
    """The segmentor of `config.model` (its classes those of `config.data`'s dataset unless given):

    - `decode_head="fpn"`: Semantic FPN, FPN (`channels`, 4 outputs, output op `neck_op`) and
      `FPNHead` (`head_channels`);
    - `decode_head="uper"`: UPerNet, `UPerHead` (`head_channels`, `pool_scales`) on C2-C5;
    - `aux_weight > 0`: an auxiliary `FCNHead` (`aux_channels`) on C4 with that loss weight.
    """
    cfg = config.model
    dtype = compute_dtype(config)
    num_classes = num_classes or len(registry.get("segmentation", config.data.name).class_names)
    backbone = models.create(cfg.backbone, dtype=dtype, **dict(cfg.backbone_overrides))
    if cfg.decode_head == "fpn":
        neck = FPN(cfg.channels, SpatialOp.named(cfg.neck_op, dict(cfg.op_kwargs)), dtype=dtype, num_outs=4)
        head = FPNHead(num_classes, cfg.head_channels, dropout=cfg.dropout, dtype=dtype)
    elif cfg.decode_head == "uper":
        neck, head = None, UPerHead(num_classes, cfg.head_channels, tuple(cfg.pool_scales), cfg.dropout, dtype)
    else:
        raise ValueError(f"config.model.decode_head must be one of {DECODE_HEADS}; got {cfg.decode_head!r}.")
    auxiliary = FCNHead(num_classes, cfg.aux_channels, dropout=cfg.dropout, dtype=dtype) if cfg.aux_weight > 0 else None
    return EncoderDecoder(backbone, head, neck, auxiliary, aux_weight=cfg.aux_weight)


def check_segmentation(config: ml_collections.ConfigDict, workdir: str, *, train: bool) -> None:
    """Every field the segmentation task reads before it builds anything, then the workdir."""
    cfg, model = config.data, config.model
    registry.get("segmentation", cfg.name, error=config_checks.ConfigError)
    for key in ("scale", "crop_size"):
        value = tuple(cfg[key])
        if len(value) != 2 or not all(config_checks.is_int(n) and n >= 1 for n in value):
            raise config_checks.ConfigError(f"config.data.{key} must be two positive ints; got {value!r}. Set "
                                            f"--config.data.{key}='(H, W)'.")
    low, high = cfg.ratio_range
    if not 0 < low <= high:
        raise config_checks.ConfigError(
            f"config.data.ratio_range must be (low, high) with 0 < low <= high, e.g. (0.5, 2.0); got {cfg.ratio_range!r}.")
    if model.decode_head not in DECODE_HEADS:
        raise config_checks.ConfigError(
            f"config.model.decode_head must be one of {DECODE_HEADS} (Semantic FPN, UPerNet); got {model.decode_head!r}.")
    backbone = check_backbone(config, "model.backbone", "model.backbone_overrides")
    if len(backbone.stage_strides) != 4:
        raise config_checks.ConfigError(
            f"config.model.backbone_overrides gives the backbone {len(backbone.stage_strides)} stages; the heads read "
            f"C2-C5, so give 4.")
    for path in ("model.channels", "model.head_channels", "model.aux_channels"):
        config_checks.check_int(config, path, 1)
    if model.decode_head == "fpn" and model.neck_op != "conv" and model.channels % ops.GROUP_CHANNELS:
        raise config_checks.ConfigError(
            f"config.model.channels must be a multiple of {ops.GROUP_CHANNELS} with neck_op={model.neck_op!r} (one "
            f"kernel per {ops.GROUP_CHANNELS} channels); got {model.channels}.")
    config_checks.check_run(config, workdir, train=train)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """mmcv's poly policy per iteration: `(base_lr - min_lr) x (1 - step / total)^power + min_lr`."""
    def schedule(step):
        progress = jnp.minimum(jnp.asarray(step, jnp.float32) / total_steps, 1.0)
        return (config.base_lr - config.min_lr) * (1.0 - progress) ** config.lr_power + config.min_lr

    return schedule


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """mmseg's SGD on the poly schedule; it decays every parameter (no paramwise_cfg)."""
    return optim.sgd(learning_rate_schedule(config, total_steps), momentum=config.momentum,
                     weight_decay=config.weight_decay)


def train_step(state: steps.TrainState, batch, key):
    """One SGD step: the new state and `{"loss", "decode", ("aux"), "param_norm"}`. Slots with valid 0
    (images that failed to decode) have labels 255 throughout, so they add no loss."""
    labels = batch["label"].astype(jnp.int32)

    def loss_fn(params):
        losses, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, batch["image"], labels,
                                         method="losses", mutable=["batch_stats"], rngs={"dropout": key})
        return losses["loss"], (losses, updates)

    (_, (losses, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    return state, {**losses, "param_norm": optax.tree.norm(state.params)}


def eval_step(state: steps.TrainState, batch, num_classes: int):
    """`(confusion int32 [N, N] summed over the global batch, predictions int32 [B, H, W])` at the
    labels' resolution."""
    pred = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                          batch["label"].shape[1:3], method="predict")
    return seg_metrics.confusion_matrix(pred, batch["label"].astype(jnp.int32), num_classes), pred


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `run_eval` needs besides the state: the config, the mesh, the eval split and the jitted
    `eval_step`."""

    config: ml_collections.ConfigDict
    mesh: DataMesh
    dataset: SemanticSet
    eval_fn: object


def run_eval(run: Evaluation, state, workdir: str, step: int, vis: int = 0) -> dict:
    """mIoU, mAcc, aAcc (and `IoU.<class>` per class) of `state` over the whole eval split, from
    one confusion matrix; prints mmseg's per-class table and draws `vis` pictures under
    `<workdir>/eval_<step>/`. An image that fails to decode is skipped and counted."""
    cfg = run.config.data
    total = np.zeros((run.dataset.num_classes,) * 2, np.int64)
    evaluated = corrupt = drawn = 0
    for batch in pipeline.eval_pass(semantic.examples(run.dataset, cfg, train=False), batch_size=run.mesh.per_process,
                                    num_workers=cfg.num_workers, num_threads=cfg.num_threads):
        confusion, pred = run.eval_fn(state, run.mesh.shard(batch))
        total += np.asarray(jax.device_get(confusion), np.int64)
        evaluated += int(batch["valid"].sum())
        corrupt += int(batch["corrupt"].sum())
        if drawn < vis and jax.process_index() == 0:
            # Process 0's devices hold the first slots of the global batch: its own images.
            shards = sorted(pred.addressable_shards, key=lambda shard: shard.index[0].start or 0)
            local = np.concatenate([np.asarray(shard.data) for shard in shards])[:len(batch["valid"])]
            drawn += visualize.draw_batch(batch, local, os.path.join(workdir, f"eval_{step}"), vis - drawn, drawn)
    if jax.process_count() > 1:  # each process counted its own slots
        evaluated, corrupt = (int(v) for v in np.sum(multihost_utils.process_allgather(
            np.asarray([evaluated, corrupt], np.int64)), axis=0))
    check_eval_coverage(evaluated, corrupt, len(run.dataset.records), split="the eval split",
                        advice="check config.data.data_dir.")
    scores = seg_metrics.iou_metrics(total)
    report(f"step {step}: segmentation over {evaluated} images" + (f" ({corrupt} skipped: could not be decoded)"
                                                                  if corrupt else "") + "\n"
           + seg_metrics.format_table(scores, run.dataset.class_names))
    out = {k: scores[k] for k in ("mIoU", "mAcc", "aAcc")}
    out.update({f"IoU.{name}": float(v) for name, v in zip(run.dataset.class_names, scores["IoU"])})
    return {**out, "images": evaluated, "skipped_images": corrupt}


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """The semantic segmentation task: `build` makes the data, the segmentor, its optimizer and state.

    Attributes:
      vis: eval images the final evaluation draws (prediction beside ground truth).
    """

    name: ClassVar[str] = "segmentation"
    entry_point: ClassVar[str] = "experiments.cityscapes"
    vis: int = 0
    best_metric: str = "mIoU"
    curves: dict = dataclasses.field(default_factory=lambda: {"scores": CURVES, "score_title": "score"})

    def check_config(self, config: ml_collections.ConfigDict, workdir: str, *, train: bool) -> None:
        check_segmentation(config, workdir, train=train)

    def create_model(self, config: ml_collections.ConfigDict, num_classes: int) -> EncoderDecoder:
        return create_model(config, num_classes)

    def num_classes(self, config: ml_collections.ConfigDict, variables: dict) -> int:
        """The classes of a trained segmentor's `variables`: its decode head's outputs."""
        return int(variables["params"]["decode_head"]["cls_seg"]["conv_seg"]["bias"].shape[0])

    def preprocess_image(self, config: ml_collections.ConfigDict, image) -> tuple[np.ndarray, np.ndarray]:
        """`(inputs [1, H, W, 3] float32, display [H, W, 3] uint8)`: a PIL image as evaluation sees one."""
        return semantic.preprocess_image(config.data, image)

    def inference_kwargs(self) -> dict:
        """`model.apply`'s keyword arguments that run every layer on an image batch, at inference."""
        return {"train": False}

    def build(self, config: ml_collections.ConfigDict, workdir: str, mesh: DataMesh, *, train: bool) -> Run:
        if train:
            check_pretrained(config.model.pretrained)
        dataset = registry.get("segmentation", config.data.name)
        eval_data = dataset.load(config.data, workdir, "val")
        model = create_model(config, eval_data.num_classes)
        if train:
            train_data = dataset.load(config.data, workdir, "train")
            # What the first evaluation would find wrong, found before the first step: the eval set's
            # one image size and every val label, and a sample of the train labels.
            semantic.eval_sizes(eval_data, tuple(config.data.scale))
            checked = semantic.check_labels(eval_data) + semantic.check_labels(train_data, sample=TRAIN_LABELS_CHECKED)
            log.info("Checked %d label maps before training: the val split's and a sample of the train split's.", checked)
            steps_per_epoch, total_steps = schedule_length(config, len(train_data.records))
        else:
            # The schedule's length is no part of the state a checkpoint is restored into.
            steps_per_epoch, total_steps = 1, 1
        tx = create_optimizer(config, total_steps)
        image_shape = (*config.data.crop_size, 3)

        variables = jax.jit(lambda key: init_variables(model, key, image_shape))(jax.random.key(config.seed))
        if config.model.pretrained and train:
            variables = load_pretrained(variables, config.model.pretrained)
        state = initial_state(model, tx, variables, mesh)
        evaluation = Evaluation(config, mesh, eval_data,
                                jax.jit(functools.partial(eval_step, num_classes=eval_data.num_classes)))
        if not train:
            return Run(state=state, evaluate=lambda state, step: run_eval(evaluation, state, workdir, step, self.vis))

        train_fn = jax.jit(train_step, donate_argnums=0)
        base_key = jax.random.key(config.seed + 1)

        def step_fn(state, batch, step):
            # Dropout's mask depends on the step only, so a resumed run repeats it.
            return train_fn(state, mesh.shard(batch), jax.random.fold_in(base_key, step))

        def evaluate(state, step):
            return run_eval(evaluation, state, workdir, step, self.vis if step == total_steps else 0)

        stream = pipeline.train_stream(semantic.examples(train_data, config.data, train=True), batch_size=mesh.per_process,
                                       seed=config.seed, num_workers=config.data.num_workers,
                                       num_threads=config.data.num_threads)
        return Run(state=state, evaluate=evaluate, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                   train_iter=iter(stream), step_fn=step_fn, learning_rate=learning_rate_schedule(config, total_steps))
