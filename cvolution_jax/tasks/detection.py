"""Object detection as a task of the runner: Faster R-CNN or Mask R-CNN (FPN), COCO-format data,
mmdet's losses and optimizer, and pycocotools' COCOeval as the evaluator.

    loop.train_and_evaluate(Detection(vis=8), config, workdir)    # experiments/coco.py

What the task supplies: the model (`FasterRCNN` or `MaskRCNN`, by `config.model.detector`), the
data (`cvolution_jax.data.registry`'s detection datasets by `config.data.name`, read by
`cvolution_jax.data.coco` and made examples by `cvolution_jax.data.coco_transforms`),
the optimizer (mmdet's SGD with linear warm-up and step decay, stem and first stage frozen) and
evaluation: COCOeval on the detections of the whole eval split, whose 12-number bbox summary (and
for Mask R-CNN the segm one, its numbers named `segm_AP` ...) is printed and whose detections are
written as COCO results JSON. The best checkpoint is kept by box AP.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from cvolution_jax import models, ops
from cvolution_jax.data import coco, coco_transforms, pipeline, registry, transforms
from cvolution_jax.data import masks as host_masks
from cvolution_jax.detection import Detector, evaluation, visualize
from cvolution_jax.detection.faster_rcnn import FasterRCNN, Settings, frozen
from cvolution_jax.detection.mask_rcnn import MaskRCNN
from cvolution_jax.layers import SpatialOp
from cvolution_jax.tasks.backbone import check_backbone, check_pretrained, load_pretrained
from cvolution_jax.train import optim, steps
from cvolution_jax.train.config_checks import ConfigError, check_int, check_run, check_size, is_int
from cvolution_jax.train.loop import (DataMesh, Run, check_eval_coverage, compute_dtype, initial_state, report,
                                      schedule_length)

# Right panel of curves.png: the R-CNN's accuracy on its sampled RoIs and the eval AP.
CURVES = (("train", "rcnn_accuracy", "train R-CNN accuracy"), ("eval", "AP", "eval AP"), ("eval", "AP50", "eval AP50"),
          ("eval", "segm_AP", "eval segm AP"))
# config.model fields the two-stage detectors take; one absent from the config keeps the module's default.
_TWO_STAGE_FIELDS = ("neck_op", "rpn_op", "channels", "fc_dim", "norm_eval")
_MASK_FIELDS = ("mask_op", "mask_convs", "mask_channels")


class Registered(NamedTuple):
    """A `DETECTORS` entry."""

    module: type  # the flax module, a `cvolution_jax.detection.Detector`
    settings: type  # the dataclass of its `settings` field, filled from config.model.settings
    config_fields: tuple[str, ...]  # the config.model fields it takes


# The detectors by config.model.detector. A new detector is its module(s), its configs and one line here.
DETECTORS = {
    "faster_rcnn": Registered(FasterRCNN, Settings, _TWO_STAGE_FIELDS),
    "mask_rcnn": Registered(MaskRCNN, Settings, _TWO_STAGE_FIELDS + _MASK_FIELDS),
}
# Of those fields, the ops: a kind in the config, a SpatialOp with the switches of config.model.op_kwargs in the detector.
_OP_FIELDS = ("neck_op", "rpn_op", "mask_op")
NUM_STAGES = 4  # the FPN reads C2-C5


# ---------------------------------------------------------------------------------- the config


def check_detection(config: ml_collections.ConfigDict, workdir: str, *, train: bool) -> None:
    """Every field the detection task reads before it builds anything (image scale and buckets, the
    backbone, the channel counts the ops need), then the runner's fields and the workdir."""
    cfg = config.data
    registry.get("detection", cfg.name, error=ConfigError)
    if config.model.detector not in DETECTORS:
        raise ConfigError(f"config.model.detector must be one of {', '.join(DETECTORS)}; got {config.model.detector!r}.")
    check_size(config, "data.scale")
    buckets = tuple(cfg.buckets)
    if not buckets or not all(isinstance(b, (tuple, list)) and len(b) == 2 and all(is_int(n) and n >= 1 for n in b)
                              for b in buckets):
        raise ConfigError(
            f"config.data.buckets must be one or more padded (H, W) shapes of positive ints, e.g. ((800, 1344), "
            f"(1344, 800)); got {cfg.buckets!r}."
        )
    check_int(config, "data.max_gt", 1, " (ground-truth slots per image)")
    if cfg.name == "shapes":
        check_int(config, "data.image_size", 1, " (the synthetic shapes' image size)")
    backbone = check_backbone(config, "model.backbone", "model.backbone_overrides")
    if len(backbone.stage_strides) != NUM_STAGES:
        raise ConfigError(
            f"config.model.backbone_overrides gives the backbone {len(backbone.stage_strides)} stages "
            f"(stage_sizes {tuple(backbone.stage_sizes)}); the FPN takes C2-C5, so give {NUM_STAGES}."
        )
    for field in ("channels", "fc_dim"):  # the sizes the registered detector takes
        if field in DETECTORS[config.model.detector].config_fields:
            check_int(config, f"model.{field}", 1)
    try:
        detector = create_detector(config, num_classes=1)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if backbone.stage_strides != tuple(detector.settings.strides[:NUM_STAGES]):
        raise ConfigError(
            f"config.model.settings.strides[:{NUM_STAGES}] = {tuple(detector.settings.strides[:NUM_STAGES])} are not the "
            f"strides of the backbone's C2-C5, {backbone.stage_strides} (its stem {backbone.stem!r}); the anchors and "
            f"RoIAlign would read the wrong places. Use the 'resnet' or 'rednet' stem, or set the strides to match.")
    if detector.with_mask:
        check_int(config, "data.mask_size", 1, " (Mask R-CNN trains on each object's mask cropped to M x M; 56 in the "
                  "Mask R-CNN configs)")
        if detector.mask_op.kind != "conv" and detector.mask_channels != detector.channels:
            raise ConfigError(
                f"config.model.mask_op={config.model.mask_op!r} keeps the FPN's channels, so config.model.mask_channels "
                f"({detector.mask_channels}) must equal config.model.channels ({detector.channels}); set both alike."
            )
    ops_on_channels = [f"{field}={getattr(detector, field).kind!r}" for field in _OP_FIELDS
                       if getattr(detector, field, None) is not None and getattr(detector, field).kind != "conv"]
    if ops_on_channels and detector.channels % ops.GROUP_CHANNELS:
        raise ConfigError(
            f"config.model.channels must be a multiple of {ops.GROUP_CHANNELS} with {', '.join(ops_on_channels)} "
            f"(one kernel per {ops.GROUP_CHANNELS} channels); got {detector.channels}."
        )
    check_run(config, workdir, train=train)


# ---------------------------------------------------------------------------------- model, optim


def create_detector(config: ml_collections.ConfigDict, num_classes: int) -> Detector:
    """The detector of `config.model`: a registry backbone plus FPN, RPN and box head (and for
    `detector="mask_rcnn"` the mask head).

    `config.model` needs `detector` and `backbone`; every other field it lacks (`channels`,
    `settings`, ...) keeps the module's default, which is mmdet's. The ops (`neck_op`, `rpn_op`,
    `mask_op`) are kinds ("conv", "involution", "cvolution"), each made a `SpatialOp` with the
    switches of `op_kwargs`.
    """
    dtype = compute_dtype(config)
    cfg = config.model
    if cfg.detector not in DETECTORS:
        raise ValueError(f"config.model.detector must be one of {sorted(DETECTORS)}; got {cfg.detector!r}.")
    module, settings_type, config_fields = DETECTORS[cfg.detector]
    settings = dict(cfg.get("settings", {}))
    unknown = sorted(set(settings) - set(settings_type.__dataclass_fields__))
    if unknown:
        raise ValueError(
            f"config.model.settings has unknown fields {unknown}; valid: {sorted(settings_type.__dataclass_fields__)}.")
    fields = {k: cfg[k] for k in config_fields if k in cfg}
    op_kwargs = cfg.get("op_kwargs", {})
    fields.update({k: SpatialOp.named(kind, op_kwargs) for k, kind in fields.items() if k in _OP_FIELDS})
    backbone = models.create(cfg.backbone, num_classes=1, dtype=dtype, **dict(cfg.get("backbone_overrides", {})))
    return module(
        backbone=backbone, num_classes=num_classes, dtype=dtype,
        settings=settings_type(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in settings.items()}),
        **fields)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """mmdet's 1x schedule: `base_lr` per 16 images scaled to the batch, linear warm-up over
    `warmup_steps` from `warmup_factor` x lr, x0.1 from each epoch of `lr_decay_epochs` on.

    One piece per span between the end of warm-up and the decays, joined by `optax.join_schedules`;
    a decay that comes before warm-up ends scales the rest of the warm-up ramp.
    """
    peak = config.base_lr * config.batch_size / 16
    warmup = max(config.warmup_steps, 1)
    decays = [int(round(epoch * steps_per_epoch)) for epoch in config.lr_decay_epochs]
    starts = sorted({0, warmup, *decays})
    pieces = []
    for begin in starts:
        scale = peak * 0.1 ** sum(begin >= b for b in decays)
        pieces.append(_warmup_ramp(scale, config.warmup_factor, warmup, begin) if begin < warmup
                      else optax.constant_schedule(scale))
    return optax.join_schedules(pieces, starts[1:])


def _warmup_ramp(scale: float, factor: float, warmup: int, begin: int) -> optax.Schedule:
    """`scale x (factor + (1 - factor) x step / warmup)` at `begin + count`, the piece's own count.

    Not `optax.linear_schedule`: it interpolates from the end value (`(start - end) x frac + end`),
    which in float32 loses the first warm-up values to cancellation (2e-5 - 0.02 + 0.02).
    """
    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + begin
        return scale * (factor + (1 - factor) * jnp.minimum(step / warmup, 1.0))

    return schedule


def frozen_mask(params, frozen_stages: int):
    """A tree of "frozen" / "trained" labels for `optax.multi_transform`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if frozen(tuple(str(getattr(k, "key", k)) for k in path), frozen_stages) else "trained",
        params)


def create_optimizer(config, steps_per_epoch: int, params) -> optax.GradientTransformation:
    """mmdet's SGD on `learning_rate_schedule`, nothing reaching the frozen stages (`frozen_mask`)."""
    # mmdet decays every parameter (no paramwise_cfg); its optional grad_clip clips the raw gradients.
    trained = optim.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum,
                        weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm)
    return optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()},
                                 frozen_mask(params, config.model.frozen_stages))


# -------------------------------------------------------------------------------------- steps


def train_step(state: steps.TrainState, batch, key, frozen_stages: int, loss_names: tuple[str, ...]):
    """One SGD step; returns the new state and the losses (plus `loss`, the sum of `loss_names`,
    and `param_norm`)."""
    mask = frozen_mask(state.params, frozen_stages)

    def loss_fn(params):
        # No gradient reaches frozen parameters, so XLA drops their backward computation.
        params = jax.tree.map(lambda p, m: jax.lax.stop_gradient(p) if m == "frozen" else p, params, mask)
        losses, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, batch, key,
                                         method="losses", mutable=["batch_stats"])
        return sum(losses[k] for k in loss_names), (losses, updates)

    (loss, (losses, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    return state, {**losses, "loss": loss, "param_norm": optax.tree.norm(state.params)}


def predict_step(state: steps.TrainState, batch):
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch)


# ------------------------------------------------------------------------------------ the task


@dataclasses.dataclass(frozen=True)
class Detection:
    """The detection task: `build` makes the COCO data, the detector, its optimizer and state.

    Attributes:
      vis: pictures (predictions beside ground truth) the final evaluation draws.
    """

    name: ClassVar[str] = "detection"
    entry_point: ClassVar[str] = "experiments.coco"
    vis: int = 0
    best_metric: str = "AP"
    curves: dict = dataclasses.field(default_factory=lambda: {"scores": CURVES, "score_title": "score"})

    def create_model(self, config: ml_collections.ConfigDict, num_classes: int) -> Detector:
        return create_detector(config, num_classes)

    def num_classes(self, config: ml_collections.ConfigDict, variables: dict) -> int:
        """The object classes of a trained detector's `variables` (its `num_classes_in`)."""
        return DETECTORS[config.model.detector].module.num_classes_in(variables)

    def preprocess_image(self, config: ml_collections.ConfigDict, image) -> tuple[np.ndarray, np.ndarray]:
        """`(inputs [1, H, W, 3] float32, display [H, W, 3] uint8)`: a PIL image as evaluation sees one."""
        return coco_transforms.preprocess_image(config.data, image)

    def inference_kwargs(self) -> dict:
        """`model.apply`'s keyword arguments that run every layer holding a spatial op that sees only
        an image batch `[B, H, W, 3]` (the detector's `dense_head_outputs`)."""
        return {"method": "dense_head_outputs"}

    def check_config(self, config: ml_collections.ConfigDict, workdir: str, *, train: bool) -> None:
        check_detection(config, workdir, train=train)

    def build(self, config: ml_collections.ConfigDict, workdir: str, mesh: DataMesh, *, train: bool) -> Run:
        if train:
            check_pretrained(config.model.pretrained)
        paths = registry.get("detection", config.data.name).paths(config.data, workdir)
        eval_data = coco.load_coco(**paths["val"])
        model = create_detector(config, len(eval_data.category_ids))
        if model.with_mask:
            check_segm_ground_truth(eval_data.annotation_file)  # before training, not at its first evaluation
        train_data = coco.load_coco(**paths["train"]) if train else None
        train_examples = examples(config, train_data, with_mask=model.with_mask, train=True) if train else None
        # The schedule's length is no part of the state a checkpoint is restored into. An epoch is
        # the stream's: the images with targets, whole batches per size bucket (mmdet's epoch).
        steps_per_epoch, total_steps = (
            schedule_length(config, len(train_data.records), pipeline.batches_per_epoch(train_examples, config.batch_size))
            if train else (1, 1))
        height, width = config.data.buckets[0]
        example = {"image": jnp.zeros((1, height, width, 3)), "image_size": jnp.asarray([[height, width]], jnp.int32)}
        variables = jax.jit(model.init)(jax.random.key(config.seed), example)
        if config.model.pretrained and train:
            variables = load_pretrained(variables, config.model.pretrained)
        tx = create_optimizer(config, steps_per_epoch, variables["params"])
        state = initial_state(model, tx, variables, mesh)
        evaluation = Evaluation(config, mesh, model, eval_data)
        if not train:
            return Run(state=state, evaluate=lambda state, step: run_eval(evaluation, state, workdir, step, vis=self.vis))

        train_fn = jax.jit(functools.partial(train_step, frozen_stages=config.model.frozen_stages,
                                             loss_names=model.loss_names), donate_argnums=0)
        base_key = jax.random.key(config.seed + 1)

        def step_fn(state, batch, step):
            # The step's randomness (sampling) depends on the step only, so a resumed run repeats it.
            return train_fn(state, mesh.shard(batch), jax.random.fold_in(base_key, step))

        def evaluate(state, step):
            return run_eval(evaluation, state, workdir, step, vis=self.vis if step == total_steps else 0)

        train_iter = iter(pipeline.train_stream(train_examples, seed=config.seed, **loader_args(config, mesh)))
        return Run(state=state, evaluate=evaluate, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                   train_iter=train_iter, step_fn=step_fn, learning_rate=learning_rate_schedule(config, steps_per_epoch))


def examples(config: ml_collections.ConfigDict, dataset: coco.CocoDataset, *, with_mask: bool,
             train: bool) -> pipeline.Examples:
    """`dataset` as the pipeline's examples at `config.data`'s scale, buckets and ground-truth slots,
    with instance masks for a detector with a mask branch (its `with_mask`)."""
    cfg = config.data
    # Only a detector with a mask head reads instance masks; Faster R-CNN does not pay for decoding them.
    return coco_transforms.examples(dataset, train=train, scale=cfg.scale, buckets=cfg.buckets, max_gt=cfg.max_gt,
                                    mask_size=cfg.mask_size if with_mask else 0, flip_prob=cfg.flip_prob)


def loader_args(config: ml_collections.ConfigDict, mesh: DataMesh) -> dict:
    """The keyword arguments of `pipeline.train_stream` and `pipeline.eval_pass` that `config` and `mesh` give."""
    return dict(batch_size=mesh.per_process, num_workers=config.data.num_workers, num_threads=config.data.num_threads)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `run_eval` needs besides the state: the config, the mesh, the detector and the eval split."""

    config: ml_collections.ConfigDict
    mesh: DataMesh
    model: Detector
    eval_data: coco.CocoDataset


def run_eval(run: Evaluation, state, workdir: str, step: int, vis: int = 0) -> dict:
    """COCO bbox (and for Mask R-CNN segm) metrics of `state` on the whole eval split; writes the
    detections JSON (and `vis` pictures) under `<workdir>/eval_<step>/`.

    An image that fails to decode is skipped, logged and left out of COCOeval; the metrics hold
    `images` (evaluated) and `skipped_images`, whose sum is the split's size.
    """
    predict = jax.jit(predict_step)
    dataset, settings = run.eval_data, run.model.settings
    shape_of = {r.image_id: (r.height, r.width) for r in dataset.records}
    results, drawn, evaluated, skipped = [], 0, [], []
    out_dir = os.path.join(workdir, f"eval_{step}")
    keys = ("image_id", "scale", "valid", "corrupt")
    # Ground-truth masks only serve the pictures.
    eval_examples = examples(run.config, dataset, with_mask=run.model.with_mask and vis > 0, train=False)
    for batch in pipeline.eval_pass(eval_examples, **loader_args(run.config, run.mesh)):
        dets = predict(state, run.mesh.shard({k: batch[k] for k in ("image", "image_size")}))
        dets = jax.tree.map(np.asarray, multihost_utils.process_allgather(dets, tiled=True))
        host = multihost_utils.process_allgather({k: batch[k] for k in keys}, tiled=True)
        if jax.process_index() != 0:
            continue  # process 0 evaluates: it alone pastes masks and keeps the results
        real = host["valid"] > 0
        evaluated += host["image_id"][real].tolist()
        skipped += host["image_id"][host["corrupt"] > 0].tolist()
        # A skipped image keeps its id in the batch; -1 makes to_coco_results drop its slot as padding.
        image_ids = np.where(real, host["image_id"], -1)
        shapes = np.asarray([shape_of.get(int(i), (1, 1)) for i in image_ids])  # (1, 1): padding slot
        results += evaluation.to_coco_results(image_ids, dets["boxes"], dets["scores"], dets["labels"],
                                              dets["valid"], host["scale"], dataset.category_ids,
                                              masks=dets.get("masks"), image_shapes=shapes,
                                              mask_threshold=settings.mask_threshold)
        if drawn < vis:
            # The local batch is the first slice of the gathered one: its detections come first.
            drawn += _draw(batch, dets, dataset, out_dir, vis - drawn, settings.mask_threshold)
    max_dets = tuple(run.config.eval_max_dets)
    names = [(iou_type, prefix, evaluation.stat_names(max_dets))
             for iou_type, prefix in (("bbox", ""), ("segm", "segm_"))[:2 if run.model.with_mask else 1]]
    metrics = {}
    if jax.process_index() == 0:
        expected = sorted(r.image_id for r in dataset.records)
        check_eval_coverage(len(evaluated), len(skipped), len(expected), split=dataset.annotation_file,
                            advice=f"check that the image folder {dataset.image_dir} holds the right files.",
                            exactly_once=sorted(evaluated + skipped) == expected)
        evaluation.write_results(os.path.join(out_dir, "detections.json"), results)
        for iou_type, prefix, _ in names:
            # COCOeval counts every object of an image it is told about and has no detections for
            # as a miss. A skipped image was never shown to the model, so counting its objects as
            # misses would lower AP by an amount that measures file damage, not the detector: as
            # the classification eval does, the numbers are over the images evaluated, and the
            # skipped ones are reported by id (here) and counted in the metrics.
            stats = evaluation.evaluate(dataset.annotation_file, results, iou_type=iou_type, max_dets=max_dets,
                                        image_ids=evaluated)
            report(f"COCO {iou_type} evaluation:\n" + stats.pop("summary"))
            metrics.update({prefix + k: v for k, v in stats.items()})
        metrics.update(images=len(evaluated), skipped_images=len(skipped))
    # Every process gets process 0's numbers: each one's checkpoint manager ranks checkpoints by AP.
    keys = [prefix + k for _, prefix, stat_keys in names for k in stat_keys] + ["images", "skipped_images"]
    values = np.asarray([metrics.get(k, 0.0) for k in keys], np.float64)
    if jax.process_count() > 1:
        values = np.asarray(multihost_utils.broadcast_one_to_all(values))
    return {k: float(v) for k, v in zip(keys, values)}


def check_segm_ground_truth(annotation_file: str) -> None:
    """Raises a ValueError naming the annotations of the eval file whose segmentation COCOeval's
    segm evaluation cannot read (`evaluation.segm_ground_truth_problems`): without this check
    pycocotools fails at the first evaluation, after training. A training file may hold such
    annotations (the object is left out of the mask targets); the eval file may not."""
    problems = evaluation.segm_ground_truth_problems(annotation_file)
    if problems:
        raise ValueError(
            f"{annotation_file}: {len(problems)} annotations have a segmentation that COCOeval cannot evaluate "
            f"(first: {'; '.join(problems[:3])}). Mask R-CNN's segm AP reads every segmentation of the eval file, "
            f"crowds included, with pycocotools. Fix or remove them in the eval file (a training file may keep "
            f"them: those objects are left out of the mask targets).")


def _draw(batch, dets, dataset, out_dir, limit: int, mask_threshold: float) -> int:
    drawn = 0
    for i in range(len(batch["image_id"])):
        if drawn == limit or batch["valid"][i] == 0:
            continue
        picture = transforms.denormalize_image(batch["image"][i], batch["image_size"][i])
        height, width = picture.shape[:2]
        gt, valid = batch["gt_valid"][i], dets["valid"][i]
        gt_masks = pred_masks = None
        if "masks" in dets:  # both pasted into the resized image the picture shows
            gt_masks = host_masks.paste_masks(batch["masks"][i][gt], batch["boxes"][i][gt], height, width)
            pred_masks = host_masks.paste_masks(dets["masks"][i][valid], dets["boxes"][i][valid], height, width,
                                           mask_threshold)
        visualize.draw_detections(
            picture, batch["boxes"][i][gt], batch["labels"][i][gt], dets["boxes"][i][valid], dets["labels"][i][valid],
            dets["scores"][i][valid], dataset.category_names,
            os.path.join(out_dir, f"image_{int(batch['image_id'][i])}.png"), gt_masks=gt_masks, masks=pred_masks)
        drawn += 1
    return drawn
