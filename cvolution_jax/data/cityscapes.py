"""Cityscapes (fine annotations) from the user's own download, in its official layout.

    records = cityscapes.find_records("/data/cityscapes", "val")   # 500 `SemanticRecord`s
    label = cityscapes.train_ids(label_ids)                      # uint8, 19 classes + 255

Layout under `root` (leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unpacked there):
    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
                                  ... _gtFine_labelTrainIds.png   (optional, cityscapesscripts' output)

A `*_labelTrainIds.png` beside the label is read as it is (cityscapesscripts'
`createTrainIdLabelImgs` wrote it); otherwise `*_labelIds.png` is mapped to the 19 train ids with
the table of cityscapesscripts' `labels.py` (`LABEL_TO_TRAIN_ID`), every other id to 255 (ignored).
"""

from __future__ import annotations

import glob
import os

import numpy as np

from cvolution_jax.data.semantic_records import SemanticRecord

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
# cityscapesscripts' labels.py: label id -> train id, for the ids whose trainId is not 255.
LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                     26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
MAX_LABEL_ID = 33  # labels.py's ids run 0..33 ("license plate", -1, is never in a labelIds PNG)
IMAGE_SUFFIX = "_leftImg8bit.png"

_LOOKUP = np.full(256, 255, np.uint8)
for _label_id, _train_id in LABEL_TO_TRAIN_ID.items():
    _LOOKUP[_label_id] = _train_id


def train_ids(label_ids: np.ndarray, source: str = "a label map") -> np.ndarray:
    """Integer `[H, W]` label ids (0..33) -> uint8 train ids in [0, 19), 255 for the ids not trained on.

    Raises:
      ValueError: naming `source` and the ids outside 0..33, which are no Cityscapes label ids (an
        `*_instanceIds.png`, ids like 26001, given as labelIds; or another dataset's labels).
    """
    label_ids = np.asarray(label_ids)
    outside = (label_ids < 0) | (label_ids > MAX_LABEL_ID)
    if outside.any():
        found = np.unique(label_ids[outside])
        raise ValueError(
            f"{source} holds {outside.sum()} pixels of ids {', '.join(map(str, found[:8]))}{' ...' if len(found) > 8 else ''} "
            f"outside Cityscapes' label ids 0..{MAX_LABEL_ID}: it is no *_gtFine_labelIds.png (an *_instanceIds.png holds "
            f"ids like 26001). Give the labelIds or labelTrainIds PNGs of cityscapesscripts.")
    return _LOOKUP[label_ids.astype(np.uint8)]


def find_records(root: str, split: str) -> list[SemanticRecord]:
    """The `split` ("train" or "val") images of the tree at `root` with their labels, sorted by path.

    FileNotFoundError names what is missing: the split's image folder, or the first images
    without a label file.
    """
    image_dir = os.path.join(root, "leftImg8bit", split)
    images = sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX)))
    if not images:
        raise FileNotFoundError(
            f"No Cityscapes images under {image_dir}/<city>/*{IMAGE_SUFFIX}. Set config.data.data_dir to the folder "
            f"that holds leftImg8bit/ and gtFine/ (leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unpacked).")
    records, unlabelled = [], []
    for image in images:
        city = os.path.basename(os.path.dirname(image))
        stem = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
        base = os.path.join(root, "gtFine", split, city, stem + "_gtFine_")
        if os.path.exists(base + "labelTrainIds.png"):
            records.append(SemanticRecord(image, label_path=base + "labelTrainIds.png"))
        elif os.path.exists(base + "labelIds.png"):
            records.append(SemanticRecord(image, label_path=base + "labelIds.png", label_map=train_ids))
        else:
            unlabelled.append(base + "labelIds.png")
    if unlabelled:
        raise FileNotFoundError(
            f"{len(unlabelled)} of the {len(images)} {split} images have no label file, e.g. {unlabelled[0]}. Unpack "
            f"gtFine_trainvaltest.zip into {root} beside leftImg8bit/.")
    return records
