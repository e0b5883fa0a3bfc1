"""One image of a semantic segmentation set and how its label map is read (host side, numpy).

A label map is uint8 `[H, W]`: class ids in `[0, num_classes)`, 255 for pixels that count
nowhere (ignored). It comes from a PNG (Cityscapes' train ids, or its label ids mapped), or is
painted from COCO instance annotations (`objects`): each object's pixels get its class, crowd
regions 255, the rest 0 (background).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

IGNORE = 255


@dataclasses.dataclass(frozen=True, eq=False)
class SemanticRecord:
    """One image and the source of its label map. Travels to grain workers by pickle.

    Attributes:
      image_path: the RGB image file.
      label_path: a PNG of class ids, or "" when the map is painted from `objects`.
      label_map: "" (the PNG holds class ids) or "cityscapes" (it holds Cityscapes label ids, mapped
        to train ids on reading).
      objects: `((class id, COCO segmentation, iscrowd), ...)` painted in order onto background 0.
      height, width: the image's size when known without decoding it (COCO files), else 0.
    """

    image_path: str
    label_path: str = ""
    label_map: str = ""
    objects: tuple[tuple[int, Any, bool], ...] = ()
    height: int = 0
    width: int = 0


def read_label(record: SemanticRecord, height: int, width: int) -> np.ndarray:
    """uint8 `[height, width]` label map of `record` (its image's size). ValueError if a label PNG
    has another size."""
    if not record.label_path:
        return paint_objects(record.objects, height, width)
    with Image.open(record.label_path) as image:
        label = np.asarray(image)
    if label.ndim != 2:
        raise ValueError(f"Label {record.label_path} has shape {label.shape}; expected one channel of class ids "
                         f"(a mode L or P PNG).")
    if label.shape != (height, width):
        raise ValueError(f"Label {record.label_path} is {label.shape[0]}x{label.shape[1]} but its image "
                         f"{record.image_path} is {height}x{width}; they must match pixel for pixel.")
    if record.label_map == "cityscapes":
        from cvolution_jax.data import cityscapes

        return cityscapes.train_ids(label)
    return label.astype(np.uint8)


def paint_objects(objects, height: int, width: int) -> np.ndarray:
    """Background 0, each object's mask painted with its class (crowd regions with 255), later
    objects over earlier ones."""
    from cvolution_jax.data.masks import decode_segmentation

    label = np.zeros((height, width), np.uint8)
    for class_id, segmentation, crowd in objects:
        label[decode_segmentation(segmentation, height, width) > 0] = IGNORE if crowd else class_id
    return label
