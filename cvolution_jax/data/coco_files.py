"""Writing COCO-format instance datasets to disk: the one writer of `shapes` and `nuclei`.

    paths = split_paths(out_dir, "train")       # {"annotation_file": ..., "image_dir": ...}
    if not is_complete(**paths, info=info):
        write_split(out_dir, "train", info, categories, examples)

Layout under `out_dir`:
    train/000000.png ...                 the split's images, one PNG per image
    annotations/instances_train.json     COCO instances: info, images, annotations, categories

A split is written so that a killed run is never taken as complete: its annotation file, which
holds the content's `info`, is the completion marker and is written last.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from cvolution_jax.files import atomic_open


def split_paths(out_dir: str | os.PathLike, split: str) -> dict[str, str]:
    """`{"annotation_file", "image_dir"}` of `split` ("train" or "val") under `out_dir`, written or not."""
    out_dir = os.fspath(out_dir)
    return {"annotation_file": os.path.join(out_dir, "annotations", f"instances_{split}.json"),
            "image_dir": os.path.join(out_dir, split)}


def is_complete(annotation_file: str, image_dir: str, info: dict) -> bool:
    """Whether a split was written completely with content `info` (its JSON is written last)."""
    try:
        with open(annotation_file) as f:
            existing = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(existing, dict) or existing.get("info") != info:
        return False
    return all(os.path.exists(os.path.join(image_dir, image["file_name"])) for image in existing["images"])


def write_split(out_dir: str, split: str, info: dict, categories: list[dict], examples) -> dict:
    """Writes one COCO split under `split_paths(out_dir, split)` so that a killed run is never taken
    as complete; returns the annotation file's content.

    `examples` yields `(pixels uint8 [H, W, 3], image_fields, objects)` per image, `objects` a list
    of `(category_id, visible bool [H, W], annotation_fields)`; the fields are added to the
    image's / annotation's dict (e.g. `iscrowd`). Images go to a temporary folder renamed into
    place, and the annotation file (the completion marker, holding `info` for `is_complete`) is
    removed first and written last, atomically.
    """
    paths = split_paths(out_dir, split)
    annotation_file, image_dir = paths["annotation_file"], paths["image_dir"]
    if os.path.exists(annotation_file):
        os.remove(annotation_file)
    os.makedirs(os.path.dirname(annotation_file), exist_ok=True)
    temp_dir = os.path.join(out_dir, f".{split}.tmp-{os.getpid()}")
    old_dir = os.path.join(out_dir, f".{split}.old-{os.getpid()}")
    for leftover in (temp_dir, old_dir):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)
    os.makedirs(temp_dir)

    images, annotations = [], []
    for index, (pixels, image_fields, objects) in enumerate(examples):
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(os.path.join(temp_dir, file_name))
        image_id = index + 1  # COCO ids start at 1
        images.append({"id": image_id, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1],
                       **image_fields})
        for category_id, visible, fields in objects:
            annotations.append({**instance_annotation(len(annotations) + 1, image_id, category_id, visible), **fields})

    if os.path.exists(image_dir):
        os.rename(image_dir, old_dir)
    os.rename(temp_dir, image_dir)
    if os.path.exists(old_dir):
        shutil.rmtree(old_dir)

    content = {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    with atomic_open(annotation_file) as f:
        json.dump(content, f, separators=(",", ":"))
    return content


def instance_annotation(annotation_id: int, image_id: int, category_id: int, visible: np.ndarray) -> dict:
    """COCO annotation of a visible mask (bool [H, W]): compressed RLE, area, tight xywh box."""
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    rows = np.flatnonzero(visible.any(axis=1))
    cols = np.flatnonzero(visible.any(axis=0))
    x, y = int(cols[0]), int(rows[0])
    width, height = int(cols[-1]) - x + 1, int(rows[-1]) - y + 1
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(visible.sum()),
        "bbox": [float(x), float(y), float(width), float(height)],
        "iscrowd": 0,
    }
