"""The tasks' own parts: the detection schedule against mmdet's formula, and eval mode, which
builds the eval split alone."""

import inspect

import jax
import ml_collections
import numpy as np
import pytest

from cvolution_jax import data
from cvolution_jax.data import coco
from cvolution_jax.tasks import classification, detection
from cvolution_jax.train import loop
from cvolution_jax.train.loop import DataMesh
from tests import tiny_config
from tests.conftest import tiny_detection_config


def leaves(state) -> list:
    """`(path, shape, dtype)` of every array of a train state: what a checkpoint holds."""
    return [(jax.tree_util.keystr(path), x.shape, x.dtype) for path, x in jax.tree_util.tree_flatten_with_path(state)[0]]


def mmdet_learning_rate(step, *, base_lr, batch_size, warmup_steps, warmup_factor, decay_steps):
    """mmdet's linear warm-up times step decay, as one formula: peak x (warm-up factor) x 0.1^decays."""
    peak = base_lr * batch_size / 16
    warm = min(step / max(warmup_steps, 1), 1.0)
    return peak * (warmup_factor + (1 - warmup_factor) * warm) * 0.1 ** sum(step >= b for b in decay_steps)


@pytest.mark.parametrize("warmup_steps, lr_decay_epochs, steps_per_epoch", [
    (500, (8, 11), 100),  # the 1x schedule: decays long after warm-up
    (100, (8, 9.5), 4),  # decays at 32 and 38, inside the warm-up
    (0, (2,), 10),  # no warm-up: full lr from step 1
    (10, (), 5),  # no decay
    (20, (4, 4), 5),  # two decays at the warm-up's last step
])
def test_detection_schedule_is_mmdets_warmup_times_step_decay(warmup_steps, lr_decay_epochs, steps_per_epoch):
    config = ml_collections.ConfigDict(dict(base_lr=0.02, batch_size=8, warmup_steps=warmup_steps,
                                            warmup_factor=0.001, lr_decay_epochs=lr_decay_epochs))
    schedule = detection.learning_rate_schedule(config, steps_per_epoch)
    decay_steps = [int(round(e * steps_per_epoch)) for e in lr_decay_epochs]
    edges = {0, 1, warmup_steps, *decay_steps}
    steps = sorted({s for edge in edges for s in (edge - 1, edge, edge + 1) if s >= 0} | {7, 250, 1099, 1100, 5000})
    expected = [mmdet_learning_rate(s, base_lr=0.02, batch_size=8, warmup_steps=warmup_steps, warmup_factor=0.001,
                                    decay_steps=decay_steps) for s in steps]
    np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=2e-6)
    # Inside the optimizer the step is an int32 count, under jit.
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(np.asarray(steps, np.int32)), expected, rtol=2e-6)


def test_classification_eval_mode_builds_the_eval_split_alone(monkeypatch, tmp_path):
    built = []
    create_split = data.create_split

    def recording(config, *, train, **kwargs):
        built.append(train)
        return create_split(config, train=train, **kwargs)

    monkeypatch.setattr(data, "create_split", recording)
    config = tiny_config.get_config()
    run = classification.Classification().build(config, str(tmp_path), DataMesh(config.batch_size), train=False)
    assert built == [False]
    assert run.train_iter is None and run.step_fn is None
    # The state a checkpoint is restored into is the training run's: same tree, shapes and dtypes.
    trained = classification.Classification().build(config, str(tmp_path), DataMesh(config.batch_size), train=True)
    assert built == [False, True, False]
    assert leaves(run.state) == leaves(trained.state)


@pytest.mark.slow  # writes the shapes data and initialises a tiny detector twice
def test_detection_eval_mode_reads_the_val_annotations_alone(monkeypatch, tmp_path):
    loaded = []
    load_coco = coco.load_coco

    def recording(annotation_file, image_dir):
        loaded.append(annotation_file.rsplit("/", 1)[-1])
        return load_coco(annotation_file, image_dir)

    monkeypatch.setattr(coco, "load_coco", recording)
    config = tiny_detection_config(tmp_path / "shapes")
    run = detection.Detection().build(config, str(tmp_path), DataMesh(config.batch_size), train=False)
    assert loaded == ["instances_val.json"] and run.train_iter is None
    trained = detection.Detection().build(config, str(tmp_path), DataMesh(config.batch_size), train=True)
    assert leaves(run.state) == leaves(trained.state)


# ------------------------------------------------------------------------- the registry of tasks


@pytest.mark.parametrize("config_file, name, entry_point", [
    ("default.py", "classification", "experiments.imagenet"),
    ("coco_default.py", "detection", "experiments.coco"),
    ("segmentation_default.py", "segmentation", "experiments.cityscapes"),
])
def test_every_config_names_its_task_and_a_saved_one_without_the_field_is_still_read(config_file, name, entry_point):
    from cvolution_jax import tasks
    from tests.conftest import ROOT, load_config

    config = load_config(f"{ROOT}/experiments/configs/{config_file}")
    assert config.task == name and tasks.name_of(config) == name
    task = tasks.get(config)
    assert (task.name, task.entry_point) == (name, entry_point)
    for runner_and_tools in (loop.Task, tasks.UsableTask):  # every method the protocols name, with their arguments
        for method in [m for m in vars(runner_and_tools) if callable(getattr(runner_and_tools, m)) and not m.startswith("_")]:
            assert (inspect.signature(getattr(type(task), method)).parameters.keys()
                    == inspect.signature(getattr(runner_and_tools, method)).parameters.keys()), (name, method)
    # A config.json saved before configs named their task: told from the model's fields.
    legacy = ml_collections.ConfigDict({k: v for k, v in config.items() if k != "task"})
    assert tasks.name_of(legacy) == name


def test_an_unknown_task_is_refused_with_the_list():
    from cvolution_jax import tasks

    with pytest.raises(ValueError, match=r"config.task must be one of classification, detection, segmentation; got 'retina'"):
        tasks.name_of(ml_collections.ConfigDict({"task": "retina", "model": {"name": "x"}}))


def test_every_registered_detector_keeps_the_detector_contract(tmp_path):
    """`DETECTORS` is the one place a detector is named: each entry builds a `Detector` whose
    `with_mask` says whether it has the mask branch (the task asks it, not the name)."""
    from cvolution_jax.detection import Detector

    built = {}
    for name in detection.DETECTORS:
        config = tiny_detection_config(tmp_path)
        config.model.detector = name
        built[name] = detection.create_detector(config, num_classes=3)
        assert isinstance(built[name], Detector) and built[name].num_classes == 3
    assert {name: model.with_mask for name, model in built.items()} == {"faster_rcnn": False, "mask_rcnn": True}
    assert built["faster_rcnn"].mask_op is None  # the mask fields are Mask R-CNN's alone
