"""Every dataset, by task and name: `DATASETS[task][name]`, the one place a dataset is registered.

    dataset = registry.get("segmentation", config.data.name)   # ValueError naming the valid names
    split = dataset.load(config.data, workdir, "val")           # a SemanticSet

`config.data.name` picks a dataset within the config's task (`config.task`); each task's entries
are of one kind, holding what that task asks of a dataset. A new dataset is its module and one
entry here.

classification (`ClassificationDataset`: `create` -> `pipeline.Examples`, and `preprocess_image`):
  digits, fashion_mnist, imagenet, synthetic   their modules' (`cvolution_jax.data.__init__` lists them)

detection (`DetectionDataset`: `paths(config, workdir)`, the COCO instance files of each split):
  coco        COCO 2017's layout under `data_dir` (`annotations/instances_{split}2017.json`,
              `{split}2017/`), unless `{train,val}_annotations` / `{train,val}_images` name the files
  shapes      the synthetic shapes (`shapes.py`), written on first use into `data_dir` (default
              `<workdir>/shapes`)
  nuclei      the real nuclei sample (`nuclei.py`), written on first use into `data_dir` (default
              `<workdir>/nuclei`) from the stardist wheel `wheel` or one pip downloads

segmentation (`SegmentationDataset`: class names, and `records(config, workdir, split)`):
  cityscapes  the user's download in its official layout under `data_dir` (`cityscapes.py`), 19 classes
  shapes      the detection shapes, each object's visible mask painted with its class: background +
              rectangle, ellipse, triangle
  nuclei      the detection nuclei painted: background + nucleus; crowd fragments (nuclei cut to
              slivers by a tile border) are ignored (255)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import ml_collections

from cvolution_jax.data import cityscapes, coco_files, digits, fashion_mnist, imagenet, nuclei, shapes, synthetic
from cvolution_jax.data.pipeline import Examples
from cvolution_jax.data.semantic_records import SemanticRecord, SemanticSet, from_coco

SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class ClassificationDataset:
    """create: `(config, *, train, seed) -> Examples` of the train or eval split (`config` the `data`
    sub-config); preprocess_image: `(config, PIL image) -> (inputs [1, H, W, C] float32, display
    [H, W, 3] uint8)`, a photo as the eval split sees its images."""

    create: Callable[..., Examples]
    preprocess_image: Callable


@dataclasses.dataclass(frozen=True)
class DetectionDataset:
    """paths: `(config, workdir) -> {"train": {"annotation_file", "image_dir"}, "val": {...}}`, the
    COCO instance files of each split (`coco.load_coco`'s arguments), written first if the package
    makes them."""

    paths: Callable[[ml_collections.ConfigDict, str], dict[str, dict[str, str]]]


@dataclasses.dataclass(frozen=True)
class SegmentationDataset:
    """class_names: class i's name, known without reading the data; records: `(config, workdir,
    split) -> SemanticRecord`s of the split ("train" or "val")."""

    class_names: tuple[str, ...]
    records: Callable[[ml_collections.ConfigDict, str, str], Sequence[SemanticRecord]]

    def load(self, config: ml_collections.ConfigDict, workdir: str, split: str) -> SemanticSet:
        return SemanticSet(tuple(self.records(config, workdir, split)), self.class_names)


def _coco2017(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, str]]:
    """COCO 2017's layout under `data_dir` (`annotations/instances_{split}2017.json`, `{split}2017/`),
    unless `{train,val}_annotations` / `{train,val}_images` name the files."""
    del workdir
    return {split: {
        "annotation_file": (config.get(f"{split}_annotations")
                            or os.path.join(config.data_dir, "annotations", f"instances_{split}2017.json")),
        "image_dir": config.get(f"{split}_images") or os.path.join(config.data_dir, f"{split}2017"),
    } for split in SPLITS}


def _written(write: Callable[[ml_collections.ConfigDict, str], None], config: ml_collections.ConfigDict,
             workdir: str) -> dict[str, dict[str, str]]:
    """The files of a dataset this package writes into `data_dir` (default `<workdir>/<name>`),
    written if they are not on disk yet. Several processes: process 0 writes, every process waits."""
    # Imported here so grain's worker processes, which import this package, need not import jax.
    import jax
    from jax.experimental import multihost_utils

    root = config.data_dir or os.path.join(workdir, config.name)
    if jax.process_index() == 0:
        write(config, root)
    multihost_utils.sync_global_devices(f"{config.name} dataset written")
    return {split: coco_files.split_paths(root, split) for split in SPLITS}


def _write_shapes(config: ml_collections.ConfigDict, root: str) -> None:
    shapes.write_shapes(root, num_train=config.num_train, num_val=config.num_val, image_size=config.image_size,
                        seed=config.shapes_seed)


def _write_nuclei(config: ml_collections.ConfigDict, root: str) -> None:
    nuclei.write_nuclei(root, wheel=config.wheel or None)


def _cityscapes(config: ml_collections.ConfigDict, workdir: str, split: str) -> list[SemanticRecord]:
    del workdir
    return cityscapes.find_records(config.data_dir, split)


def _painted(detection: DetectionDataset, config: ml_collections.ConfigDict, workdir: str,
             split: str) -> tuple[SemanticRecord, ...]:
    """The records of a detection dataset's split, each label map painted from its instance masks."""
    return from_coco(**detection.paths(config, workdir)[split])


_SHAPES = DetectionDataset(functools.partial(_written, _write_shapes))
_NUCLEI = DetectionDataset(functools.partial(_written, _write_nuclei))

DATASETS = {
    "classification": {
        "digits": ClassificationDataset(digits.create, digits.preprocess_image),
        "fashion_mnist": ClassificationDataset(fashion_mnist.create, fashion_mnist.preprocess_image),
        "imagenet": ClassificationDataset(imagenet.create, imagenet.preprocess_image),
        "synthetic": ClassificationDataset(synthetic.create, synthetic.preprocess_image),
    },
    "detection": {
        "coco": DetectionDataset(_coco2017),
        "shapes": _SHAPES,
        "nuclei": _NUCLEI,
    },
    "segmentation": {
        "cityscapes": SegmentationDataset(cityscapes.CLASSES, _cityscapes),
        # Background 0, then the detection categories in id order (`from_coco`); crowd fragments 255.
        "shapes": SegmentationDataset(("background", *shapes.CATEGORIES), functools.partial(_painted, _SHAPES)),
        "nuclei": SegmentationDataset(("background", nuclei.CATEGORY), functools.partial(_painted, _NUCLEI)),
    },
}


def get(task: str, name: str, error: type[Exception] = ValueError):
    """The entry of dataset `name` (a `config.data.name`) of `task`; `error` (a task's config check
    passes its ConfigError) naming the valid names if there is none."""
    if task not in DATASETS:
        raise error(f"No datasets for task {task!r}; the tasks with datasets are {', '.join(DATASETS)}.")
    if name not in DATASETS[task]:
        raise error(f"config.data.name must be one of {', '.join(DATASETS[task])} for {task}; got {name!r}.")
    return DATASETS[task][name]


__all__ = ["DATASETS", "ClassificationDataset", "DetectionDataset", "SegmentationDataset", "get"]
