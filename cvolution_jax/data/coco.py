"""COCO instance files, read and validated once: `load_coco` -> `CocoDataset` of `CocoRecord`s.

    dataset = load_coco("annotations/instances_train2017.json", "train2017")
    dataset.records[0].boxes     # float32 [n, 4], (x1, y1, x2, y2) in original pixels

Malformed input is an error that names the file and the field, or an annotation skipped and
counted (`CocoDataset.skipped`, and `invalid_segmentations` for malformed masks,
`masks.segmentation_error`), never a silent wrong result. Boxes become (x1, y1, x2, y2) in
original pixels and category ids become contiguous labels [0, num_classes). The per-image
transforms that make a record a detection example are `coco_transforms`'.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cvolution_jax.data.masks import segmentation_error

log = logging.getLogger(__name__)

SKIP_CROWD = "crowd"
SKIP_NON_POSITIVE = "non-positive box size"
SKIP_OUTSIDE = "outside image"

_INT32_MAX = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True, eq=False)
class CocoRecord:
    """One image and its training targets. Travels to grain workers by pickle.

    Attributes:
      path: the image file.
      image_id: its COCO image id.
      height, width: its size in pixels as the annotation file gives it.
      boxes: float32 [n, 4], (x1, y1, x2, y2) in original pixels (COCO's xywh, no "+1").
      labels: int32 [n], contiguous labels in [0, num_classes).
      segmentations: the n annotations' raw `segmentation` (polygons or RLE; None if absent),
        kept for instance masks.
      segmentation_ok: bool [n], False where `segmentation_error` found the segmentation
        malformed: the object keeps its box but is left out of Mask R-CNN's targets.
    """

    path: str
    image_id: int
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    segmentations: tuple[Any, ...]
    segmentation_ok: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class CocoDataset:
    """A validated COCO instances file and its images.

    Attributes:
      annotation_file: the JSON file (evaluation reloads it with pycocotools).
      image_dir: the folder that `file_name`s are relative to.
      records: one `CocoRecord` per image, in the file's order, images without annotations
        included.
      category_ids: contiguous label i -> COCO category id, sorted by id.
      category_names: label i -> category name.
      skipped: number of annotations left out of the targets, by reason (`SKIP_*`).
      invalid_segmentations: number of used annotations whose segmentation is malformed (their
        boxes are targets, their masks are not).
    """

    annotation_file: str
    image_dir: str
    records: tuple[CocoRecord, ...]
    category_ids: tuple[int, ...]
    category_names: tuple[str, ...]
    skipped: dict[str, int]
    invalid_segmentations: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def load_coco(annotation_file: str | os.PathLike, image_dir: str | os.PathLike) -> CocoDataset:
    """Reads and validates a COCO instances file; checks that every image file exists.

    Errors (ValueError, naming the file, the item and the field): a missing top-level key
    (`images`, `annotations`, `categories`) or item key (`id`, `file_name`, `height`, `width`,
    `image_id`, `bbox`, `category_id`, `name`), a malformed value, a duplicate id, an
    annotation of an unknown image or unknown category. Missing image files: FileNotFoundError
    naming the first few and the count.

    Skipped and counted in `skipped` (and logged): crowd annotations (`iscrowd` 1; COCOeval
    reads crowds from the JSON itself), boxes with width or height <= 0, and boxes that do
    not overlap the image.

    Counted in `invalid_segmentations` (and logged, naming the first few): a used annotation
    whose `segmentation` is malformed (`segmentation_error`). Its box stays a target; Mask R-CNN
    leaves the object out, as mmdetection drops instances with invalid polygons when it loads
    masks, so one bad mask never stops a run.
    """
    annotation_file, image_dir = os.fspath(annotation_file), os.fspath(image_dir)
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(
            f"{annotation_file}: no such file. COCO is read from config.data.data_dir, which must hold "
            f"annotations/instances_{{train,val}}2017.json and the {{train,val}}2017/ image folders (or give the files "
            f"with config.data.{{train,val}}_annotations and _images); the embedded default needs none: "
            f"experiments/configs/coco_default.py.")
    try:
        with open(annotation_file) as f:
            content = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{annotation_file} is not valid JSON ({error}); expected a COCO instances file.") from error
    if not isinstance(content, dict):
        raise ValueError(f"{annotation_file}: expected a JSON object at the top level, got {type(content).__name__}.")
    for key in ("images", "annotations", "categories"):
        if key not in content:
            raise ValueError(
                f"{annotation_file}: missing top-level key {key!r}. A COCO instances file has 'images', "
                f"'annotations' and 'categories' lists; check that this is a detection annotation file."
            )
        if not isinstance(content[key], list):
            raise ValueError(f"{annotation_file}: top-level {key!r} must be a list, got {type(content[key]).__name__}.")

    categories = content["categories"]
    names_by_id: dict[int, str] = {}
    for index, category in enumerate(categories):
        where = _where("categories", index, category)
        _require(category, ("id", "name"), annotation_file, where)
        category_id = _integer(category["id"], annotation_file, where, "id")
        if category_id in names_by_id:
            raise ValueError(f"{annotation_file}: {where} repeats category id {category_id}; ids must be unique.")
        names_by_id[category_id] = str(category["name"])
    if not names_by_id:
        raise ValueError(f"{annotation_file}: 'categories' is empty; a detection file needs at least one category.")
    category_ids = tuple(sorted(names_by_id))
    label_of = {category_id: label for label, category_id in enumerate(category_ids)}

    images = content["images"]
    image_index_of: dict[int, int] = {}
    for index, image in enumerate(images):
        where = _where("images", index, image)
        _require(image, ("id", "file_name", "height", "width"), annotation_file, where)
        image_id = _integer(image["id"], annotation_file, where, "id")
        if not 0 <= image_id <= _INT32_MAX:
            raise ValueError(
                f"{annotation_file}: {where} has id {image_id}; image ids must be in [0, 2**31) (batches carry "
                f"them as int32)."
            )
        if image_id in image_index_of:
            raise ValueError(f"{annotation_file}: {where} repeats image id {image_id}; ids must be unique.")
        for key in ("height", "width"):
            if _integer(image[key], annotation_file, where, key) <= 0:
                raise ValueError(f"{annotation_file}: {where} has {key} {image[key]}; expected a positive int.")
        image_index_of[image_id] = index

    per_image: list[list[tuple[list[float], int, Any, bool]]] = [[] for _ in images]
    skipped = collections.Counter()
    invalid_segmentations: list[str] = []
    for index, annotation in enumerate(content["annotations"]):
        where = _where("annotations", index, annotation)
        _require(annotation, ("id", "image_id", "bbox", "category_id"), annotation_file, where)
        image_id = _integer(annotation["image_id"], annotation_file, where, "image_id")
        category_id = _integer(annotation["category_id"], annotation_file, where, "category_id")
        if image_id not in image_index_of:
            raise ValueError(
                f"{annotation_file}: {where} refers to image_id {image_id}, which no entry of 'images' has. "
                f"The annotation file is inconsistent; regenerate or fix it."
            )
        if category_id not in label_of:
            raise ValueError(
                f"{annotation_file}: {where} has category_id {category_id}, which is not in 'categories' "
                f"(ids {list(category_ids)}). The annotation file is inconsistent; regenerate or fix it."
            )
        bbox = annotation["bbox"]
        if (
            not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        ):
            raise ValueError(
                f"{annotation_file}: {where} has bbox {bbox!r}; expected [x, y, width, height], 4 finite numbers."
            )
        if annotation.get("iscrowd", 0):
            skipped[SKIP_CROWD] += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            skipped[SKIP_NON_POSITIVE] += 1
            continue
        image = images[image_index_of[image_id]]
        if min(x + w, image["width"]) <= max(x, 0) or min(y + h, image["height"]) <= max(y, 0):
            skipped[SKIP_OUTSIDE] += 1
            continue
        segmentation = annotation.get("segmentation")
        problem = None if segmentation is None else segmentation_error(segmentation, image["height"], image["width"])
        if problem is not None:
            invalid_segmentations.append(f"{where}: {problem}")
        target = ([x, y, x + w, y + h], label_of[category_id], segmentation, problem is None)
        per_image[image_index_of[image_id]].append(target)

    paths = [os.path.join(image_dir, image["file_name"]) for image in images]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} images listed in {annotation_file} do not exist, e.g. "
            f"{', '.join(missing[:3])}. Point image_dir at the folder holding the images' file_name paths "
            f"(got {image_dir})."
        )

    records = []
    for image, path, targets in zip(images, paths, per_image):
        records.append(CocoRecord(
            path=path,
            image_id=int(image["id"]),
            height=int(image["height"]),
            width=int(image["width"]),
            boxes=np.asarray([t[0] for t in targets], np.float32).reshape(-1, 4),
            labels=np.asarray([t[1] for t in targets], np.int32),
            segmentations=tuple(t[2] for t in targets),
            segmentation_ok=np.asarray([t[3] for t in targets], bool),
        ))
    num_boxes = sum(len(r.labels) for r in records)
    log.info(
        "%s: %d images, %d categories, %d annotations used; skipped: %s.", annotation_file, len(records),
        len(category_ids), num_boxes, ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "none",
    )
    if invalid_segmentations:
        log.warning(
            "%s: %d annotations have a malformed segmentation; their boxes are used, their masks are left out "
            "of Mask R-CNN training (the object is skipped there). First: %s.", annotation_file,
            len(invalid_segmentations), "; ".join(invalid_segmentations[:3]),
        )
    return CocoDataset(
        annotation_file=annotation_file,
        image_dir=image_dir,
        records=tuple(records),
        category_ids=category_ids,
        category_names=tuple(names_by_id[i] for i in category_ids),
        skipped=dict(skipped),
        invalid_segmentations=len(invalid_segmentations),
    )


def _where(section: str, index: int, item: Any) -> str:
    item_id = item.get("id") if isinstance(item, dict) else None
    return f"{section}[{index}]" + (f" (id {item_id})" if item_id is not None else "")


def _require(item: Any, keys: Sequence[str], file: str, where: str) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"{file}: {where} must be a JSON object, got {type(item).__name__}.")
    for key in keys:
        if key not in item:
            raise ValueError(
                f"{file}: {where} has no {key!r} field; every entry there needs {', '.join(map(repr, keys))}. "
                f"Fix or regenerate the annotation file."
            )


def _integer(value: Any, file: str, where: str, key: str) -> int:
    # JSON ints only: a float id or size usually means a converter bug upstream.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{file}: {where} has {key} {value!r}; expected an integer.")
    return value


__all__ = ["CocoDataset", "CocoRecord", "SKIP_CROWD", "SKIP_NON_POSITIVE", "SKIP_OUTSIDE", "load_coco"]
