"""Semantic segmentation records: one image and how its label map is read (host side, numpy),
and a split of them (`SemanticSet`).

A label map is uint8 `[H, W]`: class ids in `[0, num_classes)`, 255 for pixels that count
nowhere (ignored). It comes from a PNG (Cityscapes' train ids, or its label ids mapped by the
record's `label_map`), or is painted from COCO instance annotations (`objects`, `from_coco`):
each object's pixels get its class, crowd regions 255, the rest 0 (background).

A PNG's values are checked, never wrapped or dropped: one channel of integers (8-bit, or 16-bit
whose values fit), every class id below `num_classes` or 255, mapped ids as `label_map` checks
them. A label that breaks this is a ValueError naming the file and the values found.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from cvolution_jax.data.masks import decode_segmentation

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True, eq=False)
class SemanticRecord:
    """One image and the source of its label map. Travels to grain workers by pickle.

    Attributes:
      image_path: the RGB image file.
      label_path: a PNG of class ids, or "" when the map is painted from `objects`.
      label_map: None (the PNG holds class ids) or `label_map(values, source) -> uint8 class ids`,
        which maps (and checks) another id scheme on reading, e.g. `cityscapes.train_ids`; a
        module-level function, so that the record pickles.
      objects: `((class id, COCO segmentation, iscrowd), ...)` painted in order onto background 0.
      height, width: the image's size when known without decoding it (COCO files), else 0.
    """

    image_path: str
    label_path: str = ""
    label_map: Callable[[np.ndarray, str], np.ndarray] | None = None
    objects: tuple[tuple[int, Any, bool], ...] = ()
    height: int = 0
    width: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class SemanticSet:
    """One split: its records and the class names (class i is `class_names[i]`)."""

    records: tuple[SemanticRecord, ...]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def from_coco(annotation_file: str, image_dir: str) -> tuple[SemanticRecord, ...]:
    """Records of a COCO instances file whose label maps are painted from its segmentations:
    category ids in sorted order become classes 1, 2, ... (0 is background), crowds 255."""
    with open(annotation_file) as f:
        content = json.load(f)
    class_of = {c["id"]: i + 1 for i, c in enumerate(sorted(content["categories"], key=lambda c: c["id"]))}
    objects = {image["id"]: [] for image in content["images"]}
    for annotation in content["annotations"]:
        objects[annotation["image_id"]].append(
            (class_of[annotation["category_id"]], annotation["segmentation"], bool(annotation.get("iscrowd", 0))))
    return tuple(SemanticRecord(os.path.join(image_dir, image["file_name"]), objects=tuple(objects[image["id"]]),
                                height=int(image["height"]), width=int(image["width"]))
                 for image in content["images"])


def read_label(record: SemanticRecord, height: int, width: int, num_classes: int) -> np.ndarray:
    """uint8 `[height, width]` label map of `record` (its image's size), class ids in
    `[0, num_classes)` or 255. ValueError if a label PNG has another size, mode or values (above)."""
    if not record.label_path:
        return paint_objects(record.objects, height, width)
    with Image.open(record.label_path) as image:
        mode = image.mode
        label = np.asarray(image)
    if label.ndim != 2:
        raise ValueError(f"Label {record.label_path} has shape {label.shape}; expected one channel of class ids "
                         f"(a mode L or P PNG).")
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        raise ValueError(f"Label {record.label_path} holds {label.dtype} values (PNG mode {mode}); expected integer class "
                         f"ids (a mode L or P PNG).")
    if label.shape != (height, width):
        raise ValueError(f"Label {record.label_path} is {label.shape[0]}x{label.shape[1]} but its image "
                         f"{record.image_path} is {height}x{width}; they must match pixel for pixel.")
    if record.label_map is not None:
        return record.label_map(label, f"Label {record.label_path}")
    outside = ((label < 0) | (label >= num_classes)) & (label != IGNORE_INDEX)  # a 16-bit label's values past 255 too
    if outside.any():
        found = np.unique(label[outside])
        raise ValueError(
            f"Label {record.label_path} holds {outside.sum()} pixels of class ids {', '.join(map(str, found[:8]))}"
            f"{' ...' if len(found) > 8 else ''}, outside this dataset's {num_classes} classes (0..{num_classes - 1}) and "
            f"{IGNORE_INDEX} (ignored){f' (PNG mode {mode}: 16-bit)' if label.dtype.itemsize > 1 else ''}. Give label maps of "
            f"class ids (Cityscapes: the labelTrainIds PNGs, or labelIds mapped by this project).")
    return label.astype(np.uint8)


def paint_objects(objects, height: int, width: int) -> np.ndarray:
    """Background 0, each object's mask painted with its class (crowd regions with 255), later
    objects over earlier ones."""
    label = np.zeros((height, width), np.uint8)
    for class_id, segmentation, crowd in objects:
        label[decode_segmentation(segmentation, height, width) > 0] = IGNORE_INDEX if crowd else class_id
    return label
