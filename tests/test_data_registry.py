"""The one dataset registry, by task and name: what each task lists, the errors that name the valid
names, where the detection datasets' COCO files are (and the written ones on disk), the painted
segmentation records."""

import glob
import importlib
import json
import os

import ml_collections
import pytest

from cvolution_jax import tasks
from cvolution_jax.data import coco, registry
from cvolution_jax.train.config_checks import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(**fields):
    config = ml_collections.ConfigDict(dict(name="coco", data_dir="", num_train=2, num_val=1, image_size=32,
                                            shapes_seed=0, wheel="", train_annotations="", val_annotations="",
                                            train_images="", val_images=""))
    config.update(fields)
    return config


def test_the_registry_lists_every_dataset_of_every_task_with_the_entry_its_task_reads():
    assert {task: tuple(names) for task, names in registry.DATASETS.items()} == {
        "classification": ("digits", "fashion_mnist", "imagenet", "synthetic"),
        "detection": ("coco", "shapes", "nuclei"),
        "segmentation": ("cityscapes", "shapes", "nuclei"),
    }
    kinds = {"classification": registry.ClassificationDataset, "detection": registry.DetectionDataset,
             "segmentation": registry.SegmentationDataset}
    assert set(registry.DATASETS) == set(kinds) == set(tasks.TASKS)
    for task, datasets in registry.DATASETS.items():
        for name, dataset in datasets.items():
            assert registry.get(task, name) is dataset and isinstance(dataset, kinds[task]), (task, name)
    classes = {name: dataset.class_names for name, dataset in registry.DATASETS["segmentation"].items()}
    assert (len(classes["cityscapes"]), classes["shapes"], classes["nuclei"]) == (
        19, ("background", "rectangle", "ellipse", "triangle"), ("background", "nucleus"))


def test_every_config_names_a_dataset_of_its_task():
    checked = 0
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py"))):
        module = importlib.import_module(f"experiments.configs.{os.path.basename(path)[:-3]}")
        config = module.get_config() if hasattr(module, "get_config") else None
        if config is None or "task" not in config:  # common.py; a study of several runs
            continue
        registry.get(config.task, config.data.name)
        checked += 1
    assert checked >= 30


@pytest.mark.parametrize("task, valid", [
    ("classification", "digits, fashion_mnist, imagenet, synthetic"),
    ("detection", "coco, shapes, nuclei"),
    ("segmentation", "cityscapes, shapes, nuclei"),
])
def test_an_unknown_name_is_an_error_listing_the_valid_ones(task, valid):
    with pytest.raises(ValueError, match=f"config.data.name must be one of {valid} for {task}; got 'voc'"):
        registry.get(task, "voc")
    with pytest.raises(ConfigError, match=f"must be one of {valid} for {task}"):
        registry.get(task, "voc", error=ConfigError)


def test_an_unknown_task_names_the_tasks_with_datasets():
    with pytest.raises(ValueError, match="No datasets for task 'retina'; the tasks with datasets are classification, "
                                         "detection, segmentation"):
        registry.get("retina", "coco")


def test_coco_reads_the_2017_layout_unless_files_are_named():
    paths = registry.get("detection", "coco").paths(data_config(data_dir="/data/coco"), "/runs/x")
    assert paths == {
        "train": {"annotation_file": "/data/coco/annotations/instances_train2017.json", "image_dir": "/data/coco/train2017"},
        "val": {"annotation_file": "/data/coco/annotations/instances_val2017.json", "image_dir": "/data/coco/val2017"},
    }
    named = registry.get("detection", "coco").paths(
        data_config(data_dir="/data/coco", val_annotations="/a/v.json", val_images="/a/v"), "/runs/x")
    assert named["val"] == {"annotation_file": "/a/v.json", "image_dir": "/a/v"}
    assert named["train"] == paths["train"]


def test_shapes_are_written_into_the_workdir_by_default_and_found_again(tmp_path):
    shapes = registry.get("detection", "shapes")
    paths = shapes.paths(data_config(name="shapes"), str(tmp_path))
    assert paths["val"] == {"annotation_file": f"{tmp_path}/shapes/annotations/instances_val.json",
                            "image_dir": f"{tmp_path}/shapes/val"}
    assert [len(coco.load_coco(**paths[s]).records) for s in ("train", "val")] == [2, 1]
    before = (tmp_path / "shapes" / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert shapes.paths(data_config(name="shapes"), str(tmp_path)) == paths
    assert (tmp_path / "shapes" / "annotations" / "instances_train.json").stat().st_mtime_ns == before
    info = json.loads((tmp_path / "shapes" / "annotations" / "instances_val.json").read_text())["info"]
    assert (info["num_images"], info["image_size"]) == (1, 32)


def test_segmentation_shapes_are_the_detection_files_painted(tmp_path):
    split = registry.get("segmentation", "shapes").load(data_config(name="shapes"), str(tmp_path), "train")
    files = coco.load_coco(**registry.get("detection", "shapes").paths(data_config(name="shapes"), str(tmp_path))["train"])
    assert split.num_classes == 4 and len(split.records) == 2
    assert [r.image_path for r in split.records] == [r.path for r in files.records]
    assert [len(r.objects) for r in split.records] == [len(r.labels) for r in files.records]
