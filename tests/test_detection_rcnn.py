"""Faster / Mask R-CNN end to end: a tiny Mask R-CNN overfits the boxes and masks of two images;
freezing follows mmdet."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvolution_jax import models
from cvolution_jax.data import masks
from cvolution_jax.detection import Detector
from cvolution_jax.detection.faster_rcnn import FasterRCNN, Settings, frozen
from cvolution_jax.detection.mask_rcnn import MaskRCNN
from cvolution_jax.layers import SpatialOp
from cvolution_jax.tasks import detection as loop
from cvolution_jax.train import steps


def tiny_detector(neck_op="conv", cls=MaskRCNN):
    backbone = models.create("resnet50", num_classes=1, stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=16)
    settings = Settings(anchor_scale=4.0, rpn_samples=64, train_nms_pre=100, train_proposals=32, rcnn_samples=32,
                        test_nms_pre=100, test_proposals=32, detections_nms_pre=64, max_detections=10)
    extra = {"mask_channels": 32} if cls is MaskRCNN else {}
    return cls(backbone=backbone, num_classes=2, neck_op=SpatialOp(neck_op, impl="xla"), channels=32, fc_dim=64,
               settings=settings, norm_eval=False, **extra)


MASK_SIZE = 28  # ground-truth crops


def two_images():
    """Two 64x64 images with ellipses filling their boxes: the batch (with box-crop masks, as the
    data pipeline makes them) and the image-size ground-truth masks [2, 3, 64, 64]."""
    rng = np.random.default_rng(0)
    images = rng.normal(0, 0.3, (2, 64, 64, 3)).astype(np.float32)
    boxes = np.zeros((2, 3, 4), np.float32)
    labels = np.full((2, 3), -1, np.int32)
    full = np.zeros((2, 3, 64, 64), np.uint8)
    crops = np.zeros((2, 3, MASK_SIZE, MASK_SIZE), np.uint8)
    yy, xx = np.mgrid[:64, :64] + 0.5
    for b, objects in enumerate([[(8, 8, 30, 26, 0), (36, 30, 60, 60, 1)], [(20, 4, 44, 20, 1), (4, 36, 28, 62, 0), (40, 40, 56, 56, 0)]]):
        for g, (x1, y1, x2, y2, label) in enumerate(objects):
            ellipse = ((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1
            images[b, ellipse, label] += 2.0
            boxes[b, g], labels[b, g], full[b, g] = (x1, y1, x2, y2), label, ellipse
            crops[b, g] = masks.crop_mask(full[b, g], boxes[b, g], MASK_SIZE) >= 0.5
    batch = {"image": jnp.asarray(images), "image_size": jnp.full((2, 2), 64, jnp.int32), "boxes": jnp.asarray(boxes),
             "labels": jnp.asarray(labels), "gt_valid": jnp.asarray(labels >= 0), "masks": jnp.asarray(crops)}
    return batch, full


@pytest.mark.slow  # 51 s on 2 CPU cores; the Mask R-CNN default's slow test trains it end to end too
def test_tiny_mask_rcnn_overfits_boxes_and_masks_of_two_images():
    model, (batch, gt_masks) = tiny_detector(), two_images()
    variables = model.init(jax.random.key(0), batch)
    num_steps = 400  # Adam with cosine decay: the loss settles instead of bouncing with the RoI sampling
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    tx=optax.adam(optax.cosine_decay_schedule(3e-3, num_steps)), batch_stats=variables["batch_stats"])
    step = jax.jit(lambda s, k: loop.train_step(s, batch, k, frozen_stages=-1, loss_names=model.loss_names))
    losses = []
    for i in range(num_steps):
        state, metrics = step(state, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first / 10, (first, last)

    dets = jax.tree.map(np.asarray, model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch))
    assert dets["masks"].shape == (2, 10, 28, 28)
    for b in range(2):
        valid = dets["valid"][b]
        found, scores, found_labels = dets["boxes"][b][valid], dets["scores"][b][valid], dets["labels"][b][valid]
        pasted = masks.paste_masks(dets["masks"][b][valid], found, 64, 64)
        for gt, label, gt_mask in zip(np.asarray(batch["boxes"][b]), np.asarray(batch["labels"][b]), gt_masks[b]):
            if label < 0:
                continue
            # A confident detection of the right class lies on the object, and so does its mask.
            mine = (found_labels == label) & (scores > 0.5)
            inter = np.prod(np.clip(np.minimum(found[:, 2:], gt[2:]) - np.maximum(found[:, :2], gt[:2]), 0, None), axis=1)
            union = np.prod(found[:, 2:] - found[:, :2], axis=1) + np.prod(gt[2:] - gt[:2]) - inter
            box_iou = np.where(mine, inter / union, 0)
            assert box_iou.max(initial=0) > 0.5
            best = pasted[box_iou.argmax()]
            assert (best & gt_mask.astype(bool)).sum() / (best | gt_mask.astype(bool)).sum() > 0.7


@pytest.mark.slow  # 16 s; the default-suite overfit test and experiments test run the same paths
def test_output_shapes_are_static():
    model, (batch, _) = tiny_detector("involution", cls=FasterRCNN), two_images()
    variables = model.init(jax.random.key(0), batch)
    dets = model.apply(variables, batch)
    assert {k: v.shape for k, v in dets.items()} == {"boxes": (2, 10, 4), "scores": (2, 10), "labels": (2, 10), "valid": (2, 10)}
    losses, _ = model.apply(variables, batch, jax.random.key(1), method=FasterRCNN.losses, mutable=["batch_stats"])
    assert all(np.isfinite(float(v)) for v in losses.values())


def test_mask_rcnn_is_faster_rcnn_with_the_mask_branch_on():
    """One detector: MaskRCNN overrides no method and only turns the mask branch on, with the same
    parameters as FasterRCNN(mask_op=SpatialOp("conv")); FasterRCNN is that tree without the mask head."""
    assert [n for n, v in vars(MaskRCNN).items() if callable(v) and not n.startswith("_")] == []
    batch, _ = two_images()
    shapes = lambda model: jax.tree.map(lambda v: v.shape, jax.eval_shape(model.init, jax.random.key(0), batch))  # noqa: E731
    mask_rcnn = shapes(tiny_detector())
    assert shapes(tiny_detector(cls=lambda **kw: FasterRCNN(mask_op=SpatialOp("conv"), mask_channels=32, **kw))) == mask_rcnn
    assert {k: v for k, v in mask_rcnn["params"].items() if k != "mask_head"} == shapes(tiny_detector(cls=FasterRCNN))["params"]
    assert isinstance(tiny_detector(), Detector) and isinstance(tiny_detector(cls=FasterRCNN), Detector)
    assert tiny_detector().loss_names == ("rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "rcnn_mask")
    assert tiny_detector(cls=FasterRCNN).loss_names == ("rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg")


@pytest.mark.parametrize("path, frozen_stages, expected", [
    (("backbone", "stem_conv1", "kernel"), 1, True),
    (("backbone", "layer1_0", "conv1", "kernel"), 1, True),
    (("backbone", "layer2_0", "conv1", "kernel"), 1, False),
    (("backbone", "layer1_0", "conv1", "kernel"), 0, False),
    (("backbone", "stem_bn1", "scale"), 0, True),
    (("backbone", "stem_conv1", "kernel"), -1, False),
    (("neck", "output0", "kernel"), 4, False),
])
def test_frozen_follows_mmdets_frozen_stages(path, frozen_stages, expected):
    assert frozen(path, frozen_stages) is expected


@pytest.fixture(scope="module")
def faster_rcnn_variables():
    """The tiny Faster R-CNN's variables on `two_images` (Faster R-CNN: the mask branch adds compile
    time and no backbone parameter; jitted: 7 s, against 25 s op by op)."""
    return jax.jit(tiny_detector(cls=FasterRCNN).init)(jax.random.key(0), two_images()[0])


def test_frozen_parameters_do_not_move(faster_rcnn_variables):
    model, (batch, _), variables = tiny_detector(cls=FasterRCNN), two_images(), faster_rcnn_variables
    config = loop_config()
    tx = loop.create_optimizer(config, steps_per_epoch=10, params=variables["params"])
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"])
    new, _ = jax.jit(lambda s: loop.train_step(s, batch, jax.random.key(0), frozen_stages=1, loss_names=model.loss_names))(state)
    before, after = variables["params"]["backbone"], new.params["backbone"]
    for name in before:
        moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
        assert moved == (not (name.startswith("stem_") or name.startswith("layer1_"))), name


def test_a_damaged_image_adds_nothing_to_the_losses(faster_rcnn_variables):
    """The data pipeline's slot for an image that failed to decode (zero image, image size 0, no
    ground truth) adds no anchor and no RoI: with frozen BatchNorm (the detection configs'
    norm_eval) the losses equal those of the other image alone."""
    model, (batch, _), variables = tiny_detector(cls=FasterRCNN).clone(norm_eval=True), two_images(), faster_rcnn_variables
    losses = jax.jit(lambda b: model.apply(variables, b, jax.random.key(1), method=FasterRCNN.losses,
                                           mutable=["batch_stats"])[0])
    damaged = {**batch, "image": batch["image"].at[1].set(0.0), "image_size": batch["image_size"].at[1].set(0),
               "labels": batch["labels"].at[1].set(-1), "gt_valid": batch["gt_valid"].at[1].set(False)}
    alone = losses({k: v[:1] for k, v in batch.items()})
    with_damaged = losses(damaged)
    assert alone.keys() == with_damaged.keys()
    for name in alone:
        np.testing.assert_allclose(with_damaged[name], alone[name], rtol=1e-6, err_msg=name)
    assert float(losses(batch)["rpn_reg"]) != float(alone["rpn_reg"])  # the second image, undamaged, does count


def loop_config():
    from experiments.configs import common

    config = common.detection("resnet50")
    config.model.frozen_stages = 1
    config.warmup_steps = 1
    return config


def test_learning_rate_schedule_is_mmdets_1x():
    config = loop_config()
    config.batch_size, config.warmup_steps = 16, 500
    schedule = loop.learning_rate_schedule(config, steps_per_epoch=100)
    np.testing.assert_allclose(float(schedule(0)), 0.02 * 0.001, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(250)), 0.02 * (0.001 + 0.999 * 0.5), rtol=1e-6)
    np.testing.assert_allclose([float(schedule(s)) for s in (500, 799, 800, 1099, 1100)],
                               [0.02, 0.02, 0.002, 0.002, 0.0002], rtol=1e-5)
