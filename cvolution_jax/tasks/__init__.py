"""The tasks the runner (`cvolution_jax.train.loop`) trains and evaluates, one small module each:
its config check, model, data, loss (train step) and evaluator.

- `classification`: image classification on `cvolution_jax.data`'s datasets (`experiments/imagenet.py`).
- `detection`: Faster / Mask R-CNN on COCO-format data, COCOeval metrics (`experiments/coco.py`).
- `segmentation`: Semantic FPN / UPerNet, mIoU from one confusion matrix (`experiments/cityscapes.py`).
- `backbone`: the backbone's config check (every task) and its initialisation from an `experiments.imagenet`
  run (detection and segmentation).

A config names its task (`config.task`), and every tool that reads a config or a run asks the
task by that name for what differs (`get(config)`): its model, its evaluation's preprocessing of an
image, its entry point. A new task is its module and one line of `TASKS`.

    task = tasks.get(config)                      # a Classification, Detection or Segmentation
    model = task.create_model(config, num_classes)
    inputs, display = task.preprocess_image(config, PIL.Image.open("cat.jpg"))

Each task is the runner's `cvolution_jax.train.loop.Task` (`check_config`, `build`) and a `UsableTask`
(what the tools ask of a config or a trained run).
"""

from __future__ import annotations

import importlib
from typing import ClassVar, Protocol

import ml_collections


class UsableTask(Protocol):
    """What every task gives the tools that use a config or a trained run (count, visualize,
    kernel maps, and inference): no data is read, nothing is trained."""

    name: ClassVar[str]  # the key of TASKS, and config.task
    entry_point: ClassVar[str]  # the module that trains it, e.g. "experiments.coco"

    def create_model(self, config: ml_collections.ConfigDict, num_classes: int):
        """The flax module of `config.model` predicting `num_classes` classes (background excluded)."""

    def num_classes(self, config: ml_collections.ConfigDict, variables: dict) -> int:
        """The classes a trained model of `config` with `variables` predicts."""

    def preprocess_image(self, config: ml_collections.ConfigDict, image):
        """`(inputs [1, H, W, C] float32, display [H, W, 3] uint8)` of a PIL image, as the config's
        evaluation sees it."""

    def inference_kwargs(self) -> dict:
        """`model.apply`'s keyword arguments that run, at inference on an image batch, every layer
        whose spatial op sees only the image."""

# config.task -> "module:class" of the task (imported on first use, so that an entry point loads its own task only).
TASKS = {
    "classification": "cvolution_jax.tasks.classification:Classification",
    "detection": "cvolution_jax.tasks.detection:Detection",
    "segmentation": "cvolution_jax.tasks.segmentation:Segmentation",
}


def name_of(config: ml_collections.ConfigDict) -> str:
    """`config.task`, checked. A run saved before configs named their task (2026-12-07) has no
    such field in its `config.json`; its task is then told from its model's fields, here only."""
    name = config.get("task")
    model = config.get("model") or {}
    if name is None:
        name = ("detection" if "detector" in model else "segmentation" if "decode_head" in model
                else "classification" if "name" in model else None)
    if name is None:
        raise ValueError(f"This config names no task (config.task), and its model ({', '.join(sorted(model)) or 'none'}) "
                         f"is none of a saved run's: give the config of a training run (experiments/configs/), whose "
                         f"config.task is one of {', '.join(TASKS)}.")
    if name not in TASKS:
        raise ValueError(f"config.task must be one of {', '.join(TASKS)}; got {name!r}.")
    return name


def get(config_or_name: ml_collections.ConfigDict | str, **options):
    """The task a config names (or the task of that name), built with `options` (e.g. `vis=8`)."""
    name = config_or_name if isinstance(config_or_name, str) else name_of(config_or_name)
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; the tasks are {', '.join(TASKS)}.")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)
