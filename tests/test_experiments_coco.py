"""experiments.coco end to end on a tiny synthetic dataset: train, checkpoint, COCO eval, restore,
pictures, and backbone initialisation from an ImageNet checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvolution_jax import models
from cvolution_jax.tasks import detection
from cvolution_jax.tasks.detection import Detection
from cvolution_jax.train import checkpoint, loop, steps
from experiments.configs import coco_default
from tests.conftest import TINY_BACKBONE, tiny_detection_config
from tests.conftest import CONFIGS, load_config

BATCH = {"image": jnp.zeros((1, 64, 64, 3)), "image_size": jnp.asarray([[64, 64]], jnp.int32)}
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    config = tiny_detection_config(root / "shapes")
    metrics = loop.train_and_evaluate(Detection(vis=2), config, str(root / "run"))
    return config, root / "run", metrics


def test_training_writes_checkpoint_metrics_detections_and_pictures(trained):
    config, workdir, metrics = trained
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "segm_AP", "segm_AR100"}
    assert all(-1 <= metrics[k] <= 1 for k in ("AP", "AP50", "AR100", "segm_AP", "segm_AP50"))
    assert checkpoint.Checkpointer(str(workdir / "checkpoints")).all_steps() == [6]
    detections = json.loads((workdir / "eval_6" / "detections.json").read_text())
    assert all(set(d) == {"image_id", "category_id", "bbox", "score", "segmentation"} for d in detections)
    assert all(d["segmentation"]["size"] == [64, 64] for d in detections)
    assert {d["category_id"] for d in detections} <= {1, 2, 3}
    assert len(list((workdir / "eval_6").glob("*.png"))) == 2
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    assert all(np.isfinite(r[k]) for r in train for k in ("loss", "rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "rcnn_mask"))
    assert (workdir / "curves.png").exists()


def test_eval_mode_restores_the_same_numbers(trained):
    config, workdir, metrics = trained
    restored = loop.evaluate(Detection(), config, str(workdir))
    assert {k: restored[k] for k in metrics} == metrics
    assert json.loads((workdir / "eval_6.json").read_text())["AP"] == metrics["AP"]


@pytest.mark.slow  # the resume machinery is the classification loop's, tested bitwise there
def test_rerun_resumes_from_the_checkpoint(trained, tmp_path):
    config, workdir, _ = trained
    config.num_train_steps = 7
    config.eval_every_steps = 100
    loop.train_and_evaluate(Detection(), config, str(workdir))
    assert checkpoint.Checkpointer(str(workdir / "checkpoints")).latest_step() == 7


def imagenet_checkpoint(directory, **overrides):
    model = models.create("resnet50", num_classes=10, **{**TINY_BACKBONE, **overrides})
    state = steps.create_train_state(model, optax.sgd(0.1), (32, 32, 3), jax.random.key(3))
    ckpt = checkpoint.Checkpointer(str(directory / "checkpoints"))
    ckpt.save(1, state)
    ckpt.close()
    return state


def test_backbone_initialised_from_an_imagenet_checkpoint(tmp_path):
    state = imagenet_checkpoint(tmp_path / "imagenet")
    config = tiny_detection_config(tmp_path / "shapes")
    model = detection.create_detector(config, num_classes=3)
    variables = jax.jit(model.init)(jax.random.key(0), BATCH)
    loaded = detection.load_pretrained(variables, str(tmp_path / "imagenet"))
    expected = {k: v for k, v in state.params.items() if k != "fc"}
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["backbone"], expected)
    jax.tree.map(np.testing.assert_array_equal, loaded["batch_stats"]["backbone"], state.batch_stats)
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["neck"], variables["params"]["neck"])


def test_a_different_backbone_checkpoint_is_refused_by_name(tmp_path):
    imagenet_checkpoint(tmp_path / "imagenet", widths=(4, 8, 8, 32))
    config = tiny_detection_config(tmp_path / "shapes")
    model = detection.create_detector(config, num_classes=3)
    variables = jax.jit(model.init)(jax.random.key(0), BATCH)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"layer4_0/\S+ has shape \(32,\) in the checkpoint but \(16,\)"):
        detection.load_pretrained(variables, str(tmp_path / "imagenet"))


DETECTION_CONFIGS = [p for p in CONFIGS if os.path.basename(p).startswith(("coco", "faster_rcnn", "mask_rcnn", "nuclei"))]


@pytest.mark.parametrize("path", DETECTION_CONFIGS, ids=os.path.basename)
def test_every_detection_config_loads_and_states_its_command(path):
    config = load_config(path)
    assert config.model.backbone in models.names()
    assert "python -m experiments.coco --config experiments/configs/" + os.path.basename(path) in open(path).read()
    name = os.path.basename(path)[: -len("_1x.py")]
    if name.startswith(("faster_rcnn", "mask_rcnn")):
        assert config.model.detector == name.split("_rcnn")[0] + "_rcnn"
        ops = (config.model.neck_op, config.model.rpn_op) + ((config.model.mask_op,) if name.startswith("mask") else ())
        assert len(set(ops[1:])) == 1  # RPN and mask head share one op: conv, or the paper's "head" variants
        assert (config.batch_size, config.base_lr, config.num_epochs, tuple(config.lr_decay_epochs)) == (16, 0.02, 12.0, (8, 11))
        assert (config.warmup_steps, config.warmup_factor, config.momentum, config.weight_decay) == (500, 0.001, 0.9, 1e-4)
        assert (tuple(config.data.scale), config.data.flip_prob, config.model.frozen_stages, config.model.norm_eval) == ((1333, 800), 0.5, 1, True)


@pytest.mark.slow  # about 8 minutes on 2 CPU cores
def test_the_default_reaches_its_targets_on_held_out_shapes(tmp_path):
    metrics = loop.train_and_evaluate(Detection(), coco_default.get_config(), str(tmp_path))
    assert metrics["AP50"] >= 0.8 and metrics["AP"] >= 0.4 and metrics["segm_AP"] >= 0.4, metrics
