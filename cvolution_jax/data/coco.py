"""COCO-format detection input through grain, in static shapes for jit.

    dataset = load_coco("annotations/instances_train2017.json", "train2017")
    stream = train_stream(dataset, batch_size=2, seed=0, scale=(1333, 800),
                          buckets=((832, 1344), (1344, 832)), max_gt=100, flip_prob=0.5,
                          process_index=0, process_count=1, num_threads=4, num_workers=0)
    it = iter(stream); batch = next(it)   # see `train_stream` for the batch format
    state = it.get_state()                # `it.set_state(state)` resumes exactly here

`load_coco` reads and validates the annotation file once: malformed input is an error that
names the file and the field, or an annotation skipped and counted (`CocoDataset.skipped`, and
`invalid_segmentations` for malformed masks), never a silent wrong result. Boxes become
(x1, y1, x2, y2) in original pixels and category ids become contiguous labels [0, num_classes).
A damaged image file or a mask that fails to decode is skipped and logged when its batch is
built: one bad input never stops a run.

Per image (host side, numpy + PIL), as mmdetection's standard pipeline does: decode RGB,
resize keeping the aspect ratio so the long side is <= scale's long side and the short side
<= its short side (mmcv's `rescale_size`), horizontal flip (train), normalise with the
ImageNet mean/std, zero-pad bottom/right to a size bucket. Ground truth is padded to `max_gt`
slots. mmcv resizes with OpenCV; PIL's bilinear here also antialiases when shrinking, a small
difference that pretrained backbones do not notice.

Static shapes: a batch holds images of one bucket (H, W) only, so a jitted step compiles once
per bucket. The training order groups images by bucket like mmdetection's GroupSampler: each
epoch a seeded permutation, cut into global batches per bucket, the batches' order shuffled.
As in `pipeline.py`, every process walks the same global batches and reads only its slice, so
training is the same on any number of processes, and the stream resumes exactly from
`get_state()`.
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

import grain
import numpy as np
from PIL import Image

from cvolution_jax.data import transforms
from cvolution_jax.data.pipeline import to_iter_dataset
from cvolution_jax.data import masks as masks_lib

log = logging.getLogger(__name__)

# One batch: {"image": float32 [b, H, W, 3], "image_size": int32 [b, 2], "scale": float32 [b, 2],
# "image_id": int32 [b], "boxes": float32 [b, G, 4], "labels": int32 [b, G],
# "gt_valid": bool [b, G], "mask": float32 [b], "flipped": bool [b], "corrupt": int32 [b]}, and with
# `mask_size` M > 0 "masks": uint8 [b, G, M, M] (each ground truth's instance mask cropped to its box).
# `mask` is 0 for padding and for an image that failed to decode; `corrupt` is 1 for the latter,
# whose slot keeps its `image_id` (padding has -1) so that evaluation can report it.
Batch = dict[str, np.ndarray]

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


# ------------------------------------------------------------------------------- loading


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def segmentation_error(segmentation: Any, height: int, width: int) -> str | None:
    """Why a COCO `segmentation` cannot be a mask of a `height` x `width` image; None if it can.

    Polygons: a non-empty list of polygons, each an even number (>= 6, three points) of finite
    coordinates. pycocotools raises on fewer points, or (for a first polygon of exactly 4
    numbers) silently reads a box. RLE: `size` equal to [height, width] and `counts` (a list of
    non-negative ints, or COCO's compressed string) whose runs cover exactly height * width
    pixels. Checked in Python, without pycocotools, because its C decoder writes past the mask
    when the runs add up to more than the image.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            return "segmentation is an empty list of polygons"
        for k, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                return f"polygon {k} is not a list of finite numbers"
            if len(polygon) < 6 or len(polygon) % 2:
                return (f"polygon {k} has {len(polygon)} coordinates; a polygon needs an even number, at least 6 "
                        f"(3 points)")
        return None
    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        return f"segmentation is neither polygons nor RLE (a dict with 'size' and 'counts'): {str(segmentation)[:60]!r}"
    size = segmentation["size"]
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        return f"RLE size {size!r} differs from the image's [height, width] [{height}, {width}]"
    counts = segmentation["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _compressed_rle_counts(counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts)
        if counts is None:
            return "RLE counts is not a valid compressed RLE string"
    elif not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        return "RLE counts must be a list of ints or a compressed RLE string"
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        return f"RLE runs cover {sum(counts)} pixels (or hold a negative run), not height * width = {height * width}"
    return None


def _compressed_rle_counts(text: str) -> list[int] | None:
    """The runs of COCO's compressed RLE string (pycocotools' `rleFrString`); None if malformed.

    Each run is a little-endian sequence of 5-bit groups, one per character (value + 48), with
    0x20 set on every group but the last and 0x10 of the last the sign; from the third run on a
    run is stored as the difference to the run two before.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                return None  # the string ends inside a run
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                return None
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


# ------------------------------------------------------------------------- preprocessing


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's `rescale_size` with keep_ratio: (new_height, new_width).

    factor = min(long_max / max(h, w), short_max / min(h, w)) with long_max, short_max the
    larger and smaller entry of `scale` (e.g. (1333, 800)); sizes round half up.
    """
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def preprocess_image(config, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """A photo as evaluation sees an image: `(inputs [1, H, W, 3] float32, display [H, W, 3] uint8)`,
    resized keeping its aspect ratio to `config.scale` (the `data` sub-config's) as mmdet does and
    ImageNet-normalised, without the bucket's padding; `display` is the resized photo."""
    rgb = image.convert("RGB")
    height, width = rescale_size(rgb.height, rgb.width, tuple(config.scale))
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(rgb)
    return transforms.normalize(pixels, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)[None], pixels


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int | None:
    """Index of the first bucket (H, W) with height <= H and width <= W; None if none fits."""
    for index, (bucket_height, bucket_width) in enumerate(buckets):
        if height <= bucket_height and width <= bucket_width:
            return index
    return None


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """(record, rng) -> one example: {"image": float32 [H, W, 3], "image_size": int32 [2],
    "scale": float32 [2], "image_id": int32 [], "boxes": float32 [G, 4], "labels": int32 [G],
    "gt_valid": bool [G], "mask": float32 [], "flipped": bool [], "corrupt": int32 []} for its
    bucket (H, W), plus "masks": uint8 [G, M, M] when `mask_size` M > 0: each object's
    segmentation (polygons or RLE, decoded by pycocotools) cropped to its box on an M x M grid
    (`masks.crop_mask`), flipped with the image, 1 where the crop is >= 0.5; objects whose
    segmentation is malformed or fails to decode are left out (box too), with a warning.

    A file that fails to decode (truncated, empty, not an image) never stops a run: its slot is
    a zero image without ground truth, mask 0, corrupt 1 and its own image_id, and a warning
    names the file. With image size 0 no anchor of the slot is valid, so it adds nothing to the
    detector's losses (`test_a_damaged_image_adds_nothing_to_the_losses`); with `norm_eval=False`
    its zero image still enters the backbone's BatchNorm statistics.

    `rng` is a `np.random.Generator` for training (flip with it) and None for evaluation.
    A module-level dataclass so grain's workers can unpickle it.
    """

    scale: tuple[int, int]
    buckets: tuple[tuple[int, int], ...]
    max_gt: int
    flip_prob: float = 0.0
    mask_size: int = 0

    def __call__(self, record: CocoRecord, rng: np.random.Generator | None) -> Batch:
        # The bucket comes from the annotated size, so a file that fails to decode still fills
        # its slot of the batch the layout planned.
        new_height, new_width = rescale_size(record.height, record.width, self.scale)
        bucket = choose_bucket(new_height, new_width, self.buckets)
        if bucket is None:
            raise _no_bucket_error(record, new_height, new_width, self.scale, self.buckets)
        try:
            image = transforms.decode_rgb(record.path)
        except Exception as error:  # one unreadable file must not stop training or evaluation
            log.warning(
                "Skipping image %s (COCO image id %d): it could not be decoded (%s: %s). Its slot has mask 0 "
                "and corrupt 1.", record.path, record.image_id, type(error).__name__, error,
            )
            return _corrupt_example(record, self.buckets[bucket], self.max_gt, self.mask_size)
        if (image.height, image.width) != (record.height, record.width):
            raise ValueError(
                f"Image {record.path} is {image.height}x{image.width} (h x w) but its annotation file says "
                f"{record.height}x{record.width}; boxes would land in the wrong place. Fix the file's "
                f"height/width or the image."
            )
        if (new_height, new_width) != (record.height, record.width):
            image = image.resize((new_width, new_height), Image.BILINEAR)
        pixels = np.asarray(image)

        factors = np.asarray([new_width / record.width, new_height / record.height], np.float32)
        # Annotated boxes may poke past the image border; mmdet clips them after resizing too
        # (clipping first is the same, and gives the boxes the masks are cropped to).
        clipped = np.clip(record.boxes, 0, np.asarray([record.width, record.height] * 2, np.float32))
        if self.mask_size > 0:
            objects, crops = self._objects_with_masks(record, clipped)
        else:
            objects, crops = np.arange(min(len(record.labels), self.max_gt)), None
        boxes = clipped[objects] * np.tile(factors, 2)
        flipped = rng is not None and rng.random() < self.flip_prob
        if flipped:
            pixels = pixels[:, ::-1]
            boxes = np.stack([new_width - boxes[:, 2], boxes[:, 1], new_width - boxes[:, 0], boxes[:, 3]], axis=1)
            crops = crops[:, :, ::-1] if crops is not None else None

        out = _empty_example(self.buckets[bucket], self.max_gt, self.mask_size)
        out["image"][:new_height, :new_width] = transforms.normalize(
            pixels, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
        )
        n = len(boxes)
        out["boxes"][:n] = boxes
        out["labels"][:n] = record.labels[objects]
        out["gt_valid"][:n] = True
        if crops is not None:
            out["masks"][:n] = crops
        out["image_size"][:] = (new_height, new_width)
        out["scale"][:] = (new_height / record.height, new_width / record.width)
        out["image_id"] = np.int32(record.image_id)
        out["mask"] = np.float32(1)
        out["flipped"] = np.bool_(flipped)
        return out

    def _objects_with_masks(self, record: CocoRecord, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first (up to max_gt) objects whose masks decode, and their masks cropped to `boxes`.

        boxes: [n, 4] every object's box in original pixels. Returns int64 [k] object indices and
        uint8 [k, M, M] crops. Objects that `load_coco` found malformed, or that pycocotools cannot
        decode, are left out of this image's targets (box and mask) with a warning.
        """
        objects, crops = [], []
        for i, (segmentation, box) in enumerate(zip(record.segmentations, boxes)):
            if len(objects) == self.max_gt:
                break
            if segmentation is None:
                raise ValueError(
                    f"Image {record.path} (COCO image id {record.image_id}): object {i} has no 'segmentation', "
                    f"but Mask R-CNN needs an instance mask per object (config.data.mask_size > 0). Use an "
                    f"instances file with segmentations, or set data.mask_size=0 to train boxes only.")
            if not record.segmentation_ok[i]:
                continue  # counted and named by load_coco
            try:
                full = masks_lib.decode_segmentation(segmentation, record.height, record.width)
            except Exception as error:  # one bad mask must not stop a run: drop the object
                log.warning(
                    "Image %s (COCO image id %d): skipping object %d, its segmentation cannot be decoded at "
                    "%dx%d (%s: %s).", record.path, record.image_id, i, record.height, record.width,
                    type(error).__name__, error,
                )
                continue
            objects.append(i)
            crops.append(masks_lib.crop_mask(full, box, self.mask_size) >= 0.5)
        crops = np.asarray(crops, np.uint8).reshape(-1, self.mask_size, self.mask_size)
        return np.asarray(objects, np.int64), crops


def _corrupt_example(record: CocoRecord, bucket: tuple[int, int], max_gt: int, mask_size: int) -> Batch:
    """The slot of an image that failed to decode: a padding slot that keeps the image's id (so
    evaluation can name it) and has corrupt 1."""
    return {**_empty_example(bucket, max_gt, mask_size), "image_id": np.int32(record.image_id), "corrupt": np.int32(1)}


def _empty_example(bucket: tuple[int, int], max_gt: int, mask_size: int = 0) -> Batch:
    """A padding slot: zero image, image_id -1, labels -1, mask 0, corrupt 0 (scale 1 so dividing
    is safe)."""
    masks = {"masks": np.zeros((max_gt, mask_size, mask_size), np.uint8)} if mask_size > 0 else {}
    return {**masks,
        "image": np.zeros((*bucket, 3), np.float32),
        "image_size": np.zeros(2, np.int32),
        "scale": np.ones(2, np.float32),
        "image_id": np.int32(-1),
        "boxes": np.zeros((max_gt, 4), np.float32),
        "labels": np.full(max_gt, -1, np.int32),
        "gt_valid": np.zeros(max_gt, bool),
        "mask": np.float32(0),
        "flipped": np.bool_(False),
        "corrupt": np.int32(0),
    }


def _stack(rows: list[Batch]) -> Batch:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _no_bucket_error(record: CocoRecord, new_height: int, new_width: int, scale, buckets) -> ValueError:
    return ValueError(
        f"Image {record.path} (id {record.image_id}, {record.height}x{record.width}) is "
        f"{new_height}x{new_width} (h x w) after resizing to scale {tuple(scale)}, which fits none of the "
        f"buckets {tuple(buckets)} (H, W). The buckets must cover every size the scale produces, e.g. "
        f"(long, short) and (short, long) rounded up to the backbone's stride."
    )


def _bucket_indices(dataset: CocoDataset, scale, buckets) -> np.ndarray:
    """int32 [N]: each record's bucket (from the annotated size, no decoding); errors name the
    first image that fits no bucket."""
    indices = np.empty(len(dataset.records), np.int32)
    for i, record in enumerate(dataset.records):
        new_height, new_width = rescale_size(record.height, record.width, scale)
        bucket = choose_bucket(new_height, new_width, buckets)
        if bucket is None:
            raise _no_bucket_error(record, new_height, new_width, scale, buckets)
        indices[i] = bucket
    return indices


def _layout(
    dataset, *, batch_size, scale, buckets, max_gt, process_index, process_count, num_threads, num_workers, mask_size
) -> tuple[tuple[int, int], tuple[tuple[int, int], ...], np.ndarray]:
    """Checks a stream's options; returns `(scale, buckets)` as int tuples and each record's bucket."""
    buckets = tuple(tuple(int(s) for s in b) for b in buckets)
    if batch_size < 1:
        raise ValueError(f"batch_size (per process) must be >= 1, got {batch_size}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count), got {process_index} of {process_count}.")
    if len(scale) != 2 or min(scale) <= 0:
        raise ValueError(f"scale must be (long_max, short_max), two positive sizes, got {scale!r}.")
    if not buckets or any(len(b) != 2 or min(b) <= 0 for b in buckets):
        raise ValueError(f"buckets must be a non-empty sequence of (H, W) with positive sizes, got {buckets!r}.")
    if max_gt < 1:
        raise ValueError(f"max_gt must be >= 1, got {max_gt}.")
    if mask_size < 0:
        raise ValueError(f"mask_size must be >= 0 (0: no instance masks), got {mask_size}.")
    if num_workers < 0 or num_threads < 1:
        raise ValueError(f"num_workers must be >= 0 and num_threads >= 1, got {num_workers} and {num_threads}.")
    truncated = [r for r in dataset.records if len(r.labels) > max_gt]
    if truncated:
        log.warning(
            "%s: %d images have more than max_gt=%d boxes (up to %d); only their first %d boxes are targets.",
            dataset.annotation_file, len(truncated), max_gt, max(len(r.labels) for r in truncated), max_gt,
        )
    return tuple(scale), buckets, _bucket_indices(dataset, scale, buckets)


# ------------------------------------------------------------------------------- streams


class _TrainBatches:
    """(global batch number t, t mod batches-per-epoch) -> this process's slice, augmented.

    Caches the current epoch's plan (its global batches); the cache never travels by pickle,
    and a lost race between threads only recomputes the same plan.
    """

    def __init__(
        self, dataset, preprocess, eligible, bucket_of, num_buckets, seed, batch_size, process_count, process_index
    ):
        self.records = dataset.records
        self.preprocess = preprocess
        self.eligible = eligible  # int64 [M]: record indices in the training set
        self.bucket_of = bucket_of  # int32 [N]: bucket of each record
        self.num_buckets = num_buckets
        self.seed = seed
        self.batch_size = batch_size
        self.global_batch = batch_size * process_count
        self.process_index = process_index
        self.batches_per_epoch = sum(
            int(np.sum(bucket_of[eligible] == b)) // self.global_batch for b in range(num_buckets)
        )
        self._cached = None

    def __getstate__(self):
        return {**self.__dict__, "_cached": None}

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """int64 [batches_per_epoch, global batch]: record indices of each global batch."""
        cached = self._cached
        if cached is not None and cached[0] == epoch:
            return cached[1]
        # A spawn key keeps this stream apart from the per-image (seed, epoch, index) streams:
        # numpy seeds (s, e) and (s, e, 0) identically.
        rng = np.random.default_rng(np.random.SeedSequence((self.seed, epoch), spawn_key=(1,)))
        order = self.eligible[rng.permutation(len(self.eligible))]
        buckets = self.bucket_of[order]
        groups = []
        for b in range(self.num_buckets):
            members = order[buckets == b]
            # Each bucket's remainder sits out this epoch; the next permutation picks others.
            whole = len(members) // self.global_batch * self.global_batch
            groups.append(members[:whole].reshape(-1, self.global_batch))
        plan = np.concatenate(groups)[rng.permutation(self.batches_per_epoch)]
        self._cached = (epoch, plan)
        return plan

    def __call__(self, t: int, batch_in_epoch: int) -> Batch:
        epoch = t // self.batches_per_epoch
        global_batch = self.epoch_plan(epoch)[batch_in_epoch]
        first = self.process_index * self.batch_size
        rows = []
        for record_index in global_batch[first:first + self.batch_size]:
            record_index = int(record_index)
            # Depends on (seed, epoch, image) only: fresh flips each epoch, whatever the thread,
            # worker or number of processes.
            rng = np.random.default_rng((self.seed, epoch, record_index))
            rows.append(self.preprocess(self.records[record_index], rng))
        return _stack(rows)


def train_stream(
    dataset: CocoDataset,
    *,
    batch_size: int,
    seed: int,
    scale: tuple[int, int],
    buckets: Sequence[tuple[int, int]],
    max_gt: int,
    flip_prob: float,
    process_index: int,
    process_count: int,
    num_threads: int,
    num_workers: int,
    drop_empty: bool = True,
    mask_size: int = 0,
) -> grain.IterDataset:
    """Infinite training batches: this process's slice of each global batch.

    Each epoch: a permutation of the images seeded by (seed, epoch); per bucket, in that order,
    global batches of `batch_size * process_count` images (each bucket's remainder sits out
    the epoch); then the batches' order shuffled with the same generator. Process p takes
    images [p * batch_size, (p + 1) * batch_size) of each global batch. Image i of epoch e
    flips with `np.random.default_rng((seed, e, i))`.

    drop_empty: leave out images with no target boxes (none annotated, or all skipped; with
      masks, also none with a well-formed segmentation), as mmdetection's filter_empty_gt does.
    mask_size: M > 0 adds instance masks for Mask R-CNN (see `Preprocess`).

    Yields {"image": float32 [b, H, W, 3] normalised and zero padded, "image_size": int32 [b, 2]
    (h, w) of the resized image, "scale": float32 [b, 2] (new_h / h, new_w / w), "image_id":
    int32 [b], "boxes": float32 [b, G, 4] (x1, y1, x2, y2) in resized pixels, "labels": int32
    [b, G] (-1 in empty slots), "gt_valid": bool [b, G], "mask": float32 [b] (1, or 0 for an
    image that failed to decode), "flipped": bool [b], "corrupt": int32 [b] (1 - mask here)},
    with b = batch_size, G = max_gt and (H, W) the batch's bucket, and "masks": uint8
    [b, G, M, M] when mask_size M > 0.
    """
    scale, buckets, bucket_of = _layout(
        dataset, batch_size=batch_size, scale=scale, buckets=buckets, max_gt=max_gt, process_index=process_index,
        process_count=process_count, num_threads=num_threads, num_workers=num_workers, mask_size=mask_size,
    )
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}.")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}.")
    num_targets = np.asarray([_num_targets(r, mask_size) for r in dataset.records], np.int64)
    if not num_targets.any():
        used = sum(len(r.labels) for r in dataset.records)
        skipped = sum(dataset.skipped.values())
        if used:
            why = (f"none of its {used} usable annotations has a well-formed segmentation, which instance masks "
                   f"(mask_size {mask_size}) need")
        elif skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(dataset.skipped.items()))
            why = f"all {skipped} annotations were skipped ({reasons})"
        else:
            why = "its annotation list is empty"
        raise ValueError(
            f"{dataset.annotation_file} has no usable annotations for training: {why}. Training needs at least "
            f"one object; check that this is the instances file of the training split."
        )
    eligible = np.flatnonzero((num_targets > 0) | (not drop_empty)).astype(np.int64)
    batches = _TrainBatches(
        dataset, Preprocess(scale, buckets, max_gt, flip_prob, mask_size), eligible, bucket_of, len(buckets),
        seed, batch_size, process_count, process_index,
    )
    if batches.batches_per_epoch == 0:
        counts = np.bincount(bucket_of[eligible], minlength=len(buckets)).tolist()
        raise ValueError(
            f"No bucket holds a whole global batch ({batch_size} x {process_count} processes = "
            f"{batch_size * process_count} images): training images per bucket {counts} (buckets {buckets}). "
            f"Lower the batch size or use fewer buckets."
        )
    log.info(
        "%s train: %d of %d images (drop_empty=%s), %d global batches of %d per epoch; process %d of %d.",
        dataset.annotation_file, len(eligible), len(dataset.records), drop_empty, batches.batches_per_epoch,
        batches.global_batch, process_index, process_count,
    )
    ds = grain.MapDataset.range(batches.batches_per_epoch).repeat(None).map_with_index(batches)
    return to_iter_dataset(ds, num_workers=num_workers, num_threads=num_threads)


def _num_targets(record: CocoRecord, mask_size: int) -> int:
    """How many of the record's objects a stream can use as targets (Preprocess's rule)."""
    if mask_size == 0:
        return len(record.labels)
    # An object without any segmentation counts: Preprocess then says masks need one.
    return sum(ok or segmentation is None for ok, segmentation in zip(record.segmentation_ok, record.segmentations))


@dataclasses.dataclass(frozen=True, eq=False)
class _EvalBatch:
    """Batch number -> this process's slice of that global batch; record index -1 is padding."""

    records: tuple[CocoRecord, ...]
    preprocess: Preprocess
    slots: np.ndarray  # int64 [num_batches, batch_size]: this process's record indices
    bucket_of_batch: np.ndarray  # int32 [num_batches]

    def __call__(self, batch: int) -> Batch:
        bucket = self.preprocess.buckets[int(self.bucket_of_batch[batch])]
        rows = [
            self.preprocess(self.records[int(i)], None) if i >= 0
            else _empty_example(bucket, self.preprocess.max_gt, self.preprocess.mask_size)
            for i in self.slots[batch]
        ]
        return _stack(rows)


def eval_pass(
    dataset: CocoDataset,
    *,
    batch_size: int,
    scale: tuple[int, int],
    buckets: Sequence[tuple[int, int]],
    max_gt: int,
    process_index: int,
    process_count: int,
    num_threads: int,
    num_workers: int,
    mask_size: int = 0,
) -> grain.IterDataset:
    """One pass without augmentation: every image exactly once over all processes.

    Images are grouped by bucket (bucket order, then file order) into global batches of
    `batch_size * process_count`; each bucket's last global batch is filled with padding slots
    (zero image, image_id -1, labels -1, mask 0). Process p takes slots
    [p * batch_size, (p + 1) * batch_size) of each, so every process yields the same number of
    batches (a process may get a batch of padding only) and the global batches do not depend
    on how they are split. Batches as in `train_stream`; evaluate only slots with `mask` 1: a slot
    with corrupt 1 is an image that failed to decode (it keeps its image_id; report it), any
    other mask-0 slot is padding (image_id -1).
    """
    scale, buckets, bucket_of = _layout(
        dataset, batch_size=batch_size, scale=scale, buckets=buckets, max_gt=max_gt, process_index=process_index,
        process_count=process_count, num_threads=num_threads, num_workers=num_workers, mask_size=mask_size,
    )
    global_batch = batch_size * process_count
    groups, bucket_of_batch = [], []
    for b in range(len(buckets)):
        members = np.flatnonzero(bucket_of == b)
        num_batches = -(-len(members) // global_batch)
        padded = np.full(num_batches * global_batch, -1, np.int64)
        padded[:len(members)] = members
        groups.append(padded.reshape(num_batches, global_batch))
        bucket_of_batch += [b] * num_batches
    first = process_index * batch_size
    slots = np.concatenate(groups)[:, first:first + batch_size]
    batches = _EvalBatch(
        dataset.records, Preprocess(scale, buckets, max_gt, mask_size=mask_size), slots, np.asarray(bucket_of_batch, np.int32)
    )
    ds = grain.MapDataset.range(len(slots)).map(batches)
    return to_iter_dataset(ds, num_workers=num_workers, num_threads=num_threads)


__all__ = [
    "Batch", "CocoDataset", "CocoRecord", "Preprocess", "choose_bucket", "eval_pass", "load_coco",
    "rescale_size", "train_stream",
]
