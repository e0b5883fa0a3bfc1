"""Faster R-CNN end to end: a tiny detector overfits two images; freezing follows mmdet."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvolution_jax import models
from cvolution_jax.detection import loop
from cvolution_jax.detection.faster_rcnn import FasterRCNN, Settings, frozen
from cvolution_jax.train import steps


def tiny_detector(neck_op="conv"):
    backbone = models.create("resnet50", num_classes=1, stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=16)
    settings = Settings(anchor_scale=4.0, rpn_samples=64, train_nms_pre=100, train_proposals=32, rcnn_samples=32,
                        test_nms_pre=100, test_proposals=32, detections_nms_pre=64, max_detections=10)
    return FasterRCNN(backbone=backbone, num_classes=2, neck_op=neck_op, channels=32, fc_dim=64, settings=settings,
                      norm_eval=False, op_kwargs=(("impl", "xla"),))


def two_images():
    rng = np.random.default_rng(0)
    images = rng.normal(0, 0.3, (2, 64, 64, 3)).astype(np.float32)
    boxes = np.zeros((2, 3, 4), np.float32)
    labels = np.full((2, 3), -1, np.int32)
    for b, objects in enumerate([[(8, 8, 30, 26, 0), (36, 30, 60, 60, 1)], [(20, 4, 44, 20, 1), (4, 36, 28, 62, 0), (40, 40, 56, 56, 0)]]):
        for g, (x1, y1, x2, y2, label) in enumerate(objects):
            images[b, y1:y2, x1:x2, label] += 2.0
            boxes[b, g], labels[b, g] = (x1, y1, x2, y2), label
    return {"image": jnp.asarray(images), "image_size": jnp.full((2, 2), 64, jnp.int32), "boxes": jnp.asarray(boxes),
            "labels": jnp.asarray(labels), "gt_valid": jnp.asarray(labels >= 0)}


def test_tiny_detector_overfits_two_images():
    model, batch = tiny_detector(), two_images()
    variables = model.init(jax.random.key(0), batch)
    num_steps = 400  # Adam with cosine decay: the loss settles instead of bouncing with the RoI sampling
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    tx=optax.adam(optax.cosine_decay_schedule(3e-3, num_steps)), batch_stats=variables["batch_stats"])
    step = jax.jit(lambda s, k: loop.train_step(s, batch, k, frozen_stages=-1))
    losses = []
    for i in range(num_steps):
        state, metrics = step(state, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first / 10, (first, last)

    dets = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch)
    for b in range(2):
        valid = np.asarray(dets["valid"][b])
        found = np.asarray(dets["boxes"][b])[valid]
        scores = np.asarray(dets["scores"][b])[valid]
        for gt, label in zip(np.asarray(batch["boxes"][b]), np.asarray(batch["labels"][b])):
            if label < 0:
                continue
            # A confident detection of the right class lies on the object.
            mine = found[(np.asarray(dets["labels"][b])[valid] == label) & (scores > 0.5)]
            inter = np.prod(np.clip(np.minimum(mine[:, 2:], gt[2:]) - np.maximum(mine[:, :2], gt[:2]), 0, None), axis=1)
            union = np.prod(mine[:, 2:] - mine[:, :2], axis=1) + np.prod(gt[2:] - gt[:2]) - inter
            assert (inter / union).max(initial=0) > 0.5


@pytest.mark.slow  # 16 s; the default-suite overfit test and experiments test run the same paths
def test_output_shapes_are_static():
    model, batch = tiny_detector("involution"), two_images()
    variables = model.init(jax.random.key(0), batch)
    dets = model.apply(variables, batch)
    assert {k: v.shape for k, v in dets.items()} == {"boxes": (2, 10, 4), "scores": (2, 10), "labels": (2, 10), "valid": (2, 10)}
    losses, _ = model.apply(variables, batch, jax.random.key(1), method=FasterRCNN.losses, mutable=["batch_stats"])
    assert all(np.isfinite(float(v)) for v in losses.values())


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


def test_frozen_parameters_do_not_move():
    model, batch = tiny_detector(), two_images()
    variables = model.init(jax.random.key(0), batch)
    config = loop_config()
    tx = loop.create_optimizer(config, steps_per_epoch=10, params=variables["params"])
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"])
    new, _ = jax.jit(lambda s: loop.train_step(s, batch, jax.random.key(0), frozen_stages=1))(state)
    before, after = variables["params"]["backbone"], new.params["backbone"]
    for name in before:
        moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
        assert moved == (not (name.startswith("stem_") or name.startswith("layer1_"))), name


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
