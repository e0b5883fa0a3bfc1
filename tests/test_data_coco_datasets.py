"""The detection datasets by name: where each one's COCO files are, and the written ones on disk."""

import json

import ml_collections
import pytest

from cvolution_jax.data import coco, coco_datasets


def data_config(**fields):
    config = ml_collections.ConfigDict(dict(name="coco", data_dir="", num_train=2, num_val=1, image_size=32,
                                            shapes_seed=0, wheel="", train_annotations="", val_annotations="",
                                            train_images="", val_images=""))
    config.update(fields)
    return config


def test_coco_reads_the_2017_layout_unless_files_are_named():
    paths = coco_datasets.dataset_paths(data_config(data_dir="/data/coco"), "/runs/x")
    assert paths == {
        "train": {"annotation_file": "/data/coco/annotations/instances_train2017.json", "image_dir": "/data/coco/train2017"},
        "val": {"annotation_file": "/data/coco/annotations/instances_val2017.json", "image_dir": "/data/coco/val2017"},
    }
    named = coco_datasets.dataset_paths(data_config(data_dir="/data/coco", val_annotations="/a/v.json", val_images="/a/v"),
                                        "/runs/x")
    assert named["val"] == {"annotation_file": "/a/v.json", "image_dir": "/a/v"}
    assert named["train"] == paths["train"]


def test_shapes_are_written_into_the_workdir_by_default_and_found_again(tmp_path):
    paths = coco_datasets.dataset_paths(data_config(name="shapes"), str(tmp_path))
    assert paths["val"] == {"annotation_file": f"{tmp_path}/shapes/annotations/instances_val.json",
                            "image_dir": f"{tmp_path}/shapes/val"}
    assert [len(coco.load_coco(**paths[s]).records) for s in ("train", "val")] == [2, 1]
    before = (tmp_path / "shapes" / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert coco_datasets.dataset_paths(data_config(name="shapes"), str(tmp_path)) == paths
    assert (tmp_path / "shapes" / "annotations" / "instances_train.json").stat().st_mtime_ns == before
    info = json.loads((tmp_path / "shapes" / "annotations" / "instances_val.json").read_text())["info"]
    assert (info["num_images"], info["image_size"]) == (1, 32)


def test_an_unknown_dataset_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"config.data.name must be one of coco, shapes, nuclei for detection; got 'voc'"):
        coco_datasets.dataset_paths(data_config(name="voc"), "/runs/x")
