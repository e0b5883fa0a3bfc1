"""COCO records as detection examples: mmdet's per-image transforms and the size buckets.

    dataset = coco.load_coco("annotations/instances_train2017.json", "train2017")
    examples = coco_transforms.examples(dataset, train=True, scale=(1333, 800),
                                        buckets=((832, 1344), (1344, 832)), max_gt=100, flip_prob=0.5)
    stream = pipeline.train_stream(examples, batch_size=2, seed=0, num_workers=0, num_threads=4)
    batch = next(iter(stream))   # `Preprocess`'s keys stacked to [b, ...], and "valid" float32 [b]

Per image (host side, numpy + PIL), as mmdetection's standard pipeline does: decode RGB,
resize keeping the aspect ratio so the long side is <= scale's long side and the short side
<= its short side (mmcv's `rescale_size`), horizontal flip (train), normalise with the
ImageNet mean/std, zero-pad bottom/right to a size bucket. Ground truth is padded to `max_gt`
slots. mmcv resizes with OpenCV; PIL's bilinear here also antialiases when shrinking, a small
difference that pretrained backbones do not notice. A damaged image file or a mask that fails to
decode is skipped and logged when its batch is built: one bad input never stops a run.

Static shapes: a batch holds images of one bucket (H, W) only, so a jitted step compiles once
per bucket; `examples` gives each record its bucket from the annotated size (no decoding) and
hands the order to the pipeline's `GroupSampler`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cvolution_jax.data import masks as masks_lib
from cvolution_jax.data import transforms
from cvolution_jax.data.coco import CocoDataset, CocoRecord
from cvolution_jax.data.pipeline import Example, Examples, GroupSampler, choose_bucket
from cvolution_jax.data.transforms import rescale_size

log = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """(record, rng) -> one example: {"image": float32 [H, W, 3], "image_size": int32 [2],
    "scale": float32 [2], "image_id": int32 [], "boxes": float32 [G, 4], "labels": int32 [G],
    "gt_valid": bool [G], "flipped": bool [], "corrupt": int32 []} for its bucket (H, W), plus
    "masks": uint8 [G, M, M] when `mask_size` M > 0: each object's
    segmentation (polygons or RLE, decoded by pycocotools) cropped to its box on an M x M grid
    (`masks.crop_mask`), flipped with the image, 1 where the crop is >= 0.5; objects whose
    segmentation is malformed or fails to decode are left out (box too), with a warning.

    A file that fails to decode (truncated, empty, not an image) never stops a run: its slot is
    a zero image without ground truth, corrupt 1 (so valid 0) and its own image_id, and a warning
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

    def __call__(self, record: CocoRecord, rng: np.random.Generator | None) -> Example:
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
                "Skipping image %s (COCO image id %d): it could not be decoded (%s: %s). Its slot has valid 0 "
                "and corrupt 1.", record.path, record.image_id, type(error).__name__, error,
            )
            # The slot keeps the image's id so that evaluation can name it.
            return {**self.padding(bucket), "image_id": np.int32(record.image_id), "corrupt": np.int32(1)}
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

        out = self.padding(bucket)
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
        out["flipped"] = np.bool_(flipped)
        return out

    def padding(self, bucket: int) -> Example:
        """The empty slot of bucket `bucket`: zero image and image size, image_id -1, labels -1, no
        ground truth, corrupt 0 (scale 1, so dividing by it is safe)."""
        masks = {"masks": np.zeros((self.max_gt, self.mask_size, self.mask_size), np.uint8)} if self.mask_size > 0 else {}
        return {**masks,
            "image": np.zeros((*self.buckets[bucket], 3), np.float32),
            "image_size": np.zeros(2, np.int32),
            "scale": np.ones(2, np.float32),
            "image_id": np.int32(-1),
            "boxes": np.zeros((self.max_gt, 4), np.float32),
            "labels": np.full(self.max_gt, -1, np.int32),
            "gt_valid": np.zeros(self.max_gt, bool),
            "flipped": np.bool_(False),
            "corrupt": np.int32(0),
        }

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


def _num_targets(record: CocoRecord, mask_size: int) -> int:
    """How many of the record's objects can be targets (Preprocess's rule)."""
    if mask_size == 0:
        return len(record.labels)
    # An object without any segmentation counts: Preprocess then says masks need one.
    return sum(ok or segmentation is None for ok, segmentation in zip(record.segmentation_ok, record.segmentations))


def _train_ids(dataset: CocoDataset, mask_size: int, drop_empty: bool) -> np.ndarray:
    """int64 [M]: the records training draws from; ValueError saying why when no record has a target."""
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
    train_ids = np.flatnonzero((num_targets > 0) | (not drop_empty)).astype(np.int64)
    log.info("%s train: %d of %d images (drop_empty=%s).", dataset.annotation_file, len(train_ids),
             len(dataset.records), drop_empty)
    return train_ids


def examples(
    dataset: CocoDataset,
    *,
    train: bool,
    scale: tuple[int, int],
    buckets: Sequence[tuple[int, int]],
    max_gt: int,
    mask_size: int = 0,
    flip_prob: float = 0.0,
    drop_empty: bool = True,
) -> Examples:
    """`dataset` as the pipeline's `Examples`: `Preprocess` per image, padded slots of each bucket,
    and a `GroupSampler` over the buckets.

    train: True: the records training draws from are those with targets (`drop_empty`), and
      `flip_prob` flips; False: every record, never flipped.
    scale: (long_max, short_max) of the resize; buckets: the padded (H, W) shapes, which must
      cover every size the scale produces (ValueError naming the first image that fits none).
    max_gt: ground-truth slots per image (a warning counts the images with more boxes).
    mask_size: M > 0 adds instance masks for Mask R-CNN (see `Preprocess`).
    drop_empty: leave out of training the images with no target boxes (none annotated, or all
      skipped; with masks, also none with a well-formed segmentation), as mmdetection's
      filter_empty_gt does.

    Batches: {"image": float32 [b, H, W, 3] normalised and zero padded, "image_size": int32 [b, 2]
    (h, w) of the resized image, "scale": float32 [b, 2] (new_h / h, new_w / w), "image_id":
    int32 [b] (-1 in padding slots), "boxes": float32 [b, G, 4] (x1, y1, x2, y2) in resized pixels,
    "labels": int32 [b, G] (-1 in empty slots), "gt_valid": bool [b, G], "valid": float32 [b] (0 for
    padding and for an image that failed to decode), "flipped": bool [b], "corrupt": int32 [b] (1 for
    an image that failed to decode; its slot keeps its image_id so that evaluation can report it)},
    with G = max_gt and (H, W) the batch's bucket, and "masks": uint8 [b, G, M, M] when mask_size
    M > 0 (each ground truth's instance mask cropped to its box).
    """
    buckets = tuple(tuple(int(s) for s in b) for b in buckets)
    if len(scale) != 2 or min(scale) <= 0:
        raise ValueError(f"scale must be (long_max, short_max), two positive sizes, got {scale!r}.")
    if not buckets or any(len(b) != 2 or min(b) <= 0 for b in buckets):
        raise ValueError(f"buckets must be a non-empty sequence of (H, W) with positive sizes, got {buckets!r}.")
    if max_gt < 1:
        raise ValueError(f"max_gt must be >= 1, got {max_gt}.")
    if mask_size < 0:
        raise ValueError(f"mask_size must be >= 0 (0: no instance masks), got {mask_size}.")
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}.")
    scale = tuple(scale)
    truncated = [r for r in dataset.records if len(r.labels) > max_gt]
    if truncated:
        log.warning(
            "%s: %d images have more than max_gt=%d boxes (up to %d); only their first %d boxes are targets.",
            dataset.annotation_file, len(truncated), max_gt, max(len(r.labels) for r in truncated), max_gt,
        )
    bucket_of = _bucket_indices(dataset, scale, buckets)
    train_ids = _train_ids(dataset, mask_size, drop_empty) if train else None
    preprocess = Preprocess(scale, buckets, max_gt, flip_prob if train else 0.0, mask_size)
    return Examples(dataset.records, preprocess, preprocess.padding, dataset.num_classes,
                    GroupSampler(buckets, bucket_of, train_ids))


__all__ = ["Preprocess", "examples", "preprocess_image"]
