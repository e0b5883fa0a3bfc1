"""Semantic segmentation examples: mmseg's training transforms and its whole-image evaluation.

    dataset = registry.get("segmentation", config.data.name).load(config.data, workdir, "train")
    stream = pipeline.train_stream(semantic.examples(dataset, config.data, train=True), batch_size=4,
                                   seed=0, num_workers=0, num_threads=4)
    batch = next(iter(stream))   # {"image": f32 [b, h, w, 3], "label": u8 [b, h, w], "valid": f32 [b], ...}

The datasets (cityscapes, shapes, nuclei) are `registry.DATASETS["segmentation"]`'s.

Training, per image (mmseg's Cityscapes pipeline, host side): resize keeping the aspect ratio to
`scale` x a ratio drawn from `ratio_range` (image bilinear, label nearest), a random crop of
`crop_size` re-drawn up to 10 times while one class fills more than `cat_max_ratio` of it
(ignored pixels not counted), horizontal flip, photometric distortion, ImageNet normalisation,
padding to `crop_size` (image 0, label 255). So every training batch has one static shape.

Evaluation (mmseg's whole-image test): the image resized keeping its ratio to `scale`, normalised,
padded to the eval input size; the label stays at the original resolution, and the model's
prediction is resized back to it (`EncoderDecoder.predict`). Every eval image must therefore have
one original size and one resized size (checked, with the sizes found named).

A slot with `valid` 0 is padding or an image that failed to decode (`corrupt` 1), its label all 255.
"""

from __future__ import annotations

import dataclasses
import logging

import ml_collections
import numpy as np
from PIL import Image

from cvolution_jax.data import transforms
from cvolution_jax.data.pipeline import Examples
from cvolution_jax.data.semantic_records import IGNORE_INDEX, SemanticRecord, SemanticSet, read_label
from cvolution_jax.data.transforms import rescale_size

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ transforms


def random_crop_box(label: np.ndarray, crop_size: tuple[int, int], cat_max_ratio: float,
                    rng: np.random.Generator) -> tuple[int, int]:
    """mmseg's `RandomCrop` corner `(top, left)`: uniform in the margins; while one class holds
    `cat_max_ratio` or more of the crop's non-ignored pixels (or the crop has fewer than two
    classes), redrawn, up to 10 times (the 11th draw is taken as it is)."""
    def draw():
        return (int(rng.integers(0, max(label.shape[0] - crop_size[0], 0) + 1)),
                int(rng.integers(0, max(label.shape[1] - crop_size[1], 0) + 1)))

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            crop = label[top:top + crop_size[0], left:left + crop_size[1]]
            classes, counts = np.unique(crop, return_counts=True)
            counts = counts[classes != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness: float = 32,
                           contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                           hue: int = 18) -> np.ndarray:
    """mmseg's `PhotoMetricDistortion` on float `[H, W, 3]` RGB in 0..255, each step with probability
    1/2: brightness + U(-32, 32); contrast x U(0.5, 1.5), before or after the HSV steps (a coin);
    saturation x U(0.5, 1.5); hue + an int in [-18, 18] of OpenCV's 8-bit units (2 degrees each).
    Clipped to 0..255 after each step."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    image = np.asarray(image, np.float32)
    if rng.integers(2):
        image = np.clip(image + rng.uniform(-brightness, brightness), 0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast_step(image):
        return np.clip(image * rng.uniform(*contrast), 0, 255) if rng.integers(2) else image

    if contrast_first:
        image = contrast_step(image)
    hsv = rgb_to_hsv(image / 255.0)
    if rng.integers(2):
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation), 0, 1)
    if rng.integers(2):
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-hue, hue + 1) / 180.0) % 1.0
    image = np.clip(hsv_to_rgb(hsv) * 255.0, 0, 255).astype(np.float32)
    if not contrast_first:
        image = contrast_step(image)
    return image


def _resize(image: Image.Image, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(h, w): image bilinear, label nearest."""
    height, width = size
    if (image.height, image.width) == (height, width):
        return np.asarray(image), label
    return (np.asarray(image.resize((width, height), Image.BILINEAR)),
            np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST)))


def _empty(image_shape: tuple[int, int], label_shape: tuple[int, int]) -> dict:
    """An empty slot: zero image `[*image_shape, 3]`, label `label_shape` all ignored, corrupt 0."""
    return {"image": np.zeros((*image_shape, 3), np.float32), "label": np.full(label_shape, IGNORE_INDEX, np.uint8),
            "image_size": np.zeros(2, np.int32), "corrupt": np.int32(0)}


def _decode(record: SemanticRecord, num_classes: int):
    """(PIL RGB image, uint8 label) or None when the image or its label fails to decode (logged)."""
    try:
        image = transforms.decode_rgb(record.image_path)
        return image, read_label(record, image.height, image.width, num_classes)
    except (OSError, SyntaxError) as error:  # a damaged file never stops a run; a size mismatch does
        log.warning("Skipping %s: it or its label could not be decoded (%s: %s). Its slot has valid 0 and corrupt 1.",
                    record.image_path, type(error).__name__, error)
        return None


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """(record, rng) -> {"image": float32 [h, w, 3], "label": uint8 [h, w], "image_size": int32 [2],
    "corrupt": int32 []} with (h, w) = `crop_size`; see the module docstring. `num_classes` bounds the
    label's class ids (`read_label`)."""

    num_classes: int
    scale: tuple[int, int]
    ratio_range: tuple[float, float]
    crop_size: tuple[int, int]
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def __call__(self, record: SemanticRecord, rng: np.random.Generator) -> dict:
        decoded = _decode(record, self.num_classes)
        if decoded is None:
            return {**self.padding(0), "corrupt": np.int32(1)}
        image, label = decoded
        ratio = rng.uniform(*self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        pixels, label = _resize(image, label, rescale_size(image.height, image.width, target))
        top, left = random_crop_box(label, self.crop_size, self.cat_max_ratio, rng)
        pixels = pixels[top:top + self.crop_size[0], left:left + self.crop_size[1]]
        label = label[top:top + self.crop_size[0], left:left + self.crop_size[1]]
        if rng.random() < self.flip_prob:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        pixels = photometric_distortion(pixels, rng) if self.photometric else pixels
        out = self.padding(0)
        height, width = label.shape
        out["image"][:height, :width] = transforms.normalize(pixels, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
        out["label"][:height, :width] = label
        out["image_size"][:] = (height, width)
        return out

    def padding(self, bucket: int) -> dict:
        """The empty slot: a zero `crop_size` image, its label all ignored (one bucket: `bucket` is 0)."""
        return _empty(self.crop_size, self.crop_size)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """record -> {"image": float32 [*input_size, 3] (resized to `scale` keeping the ratio, padded),
    "label": uint8 `label_size` (original resolution), "image_size": int32 [2] (resized), "corrupt"}."""

    num_classes: int
    scale: tuple[int, int]
    input_size: tuple[int, int]
    label_size: tuple[int, int]

    def __call__(self, record: SemanticRecord, rng=None) -> dict:
        decoded = _decode(record, self.num_classes)
        if decoded is None:
            return {**self.padding(0), "corrupt": np.int32(1)}
        image, label = decoded
        if label.shape != self.label_size:
            raise ValueError(f"Eval image {record.image_path} is {label.shape[0]}x{label.shape[1]}; the eval set was "
                             f"planned for {self.label_size[0]}x{self.label_size[1]} from its first image.")
        height, width = rescale_size(image.height, image.width, self.scale)
        pixels = np.asarray(image.resize((width, height), Image.BILINEAR) if (height, width) != label.shape else image)
        out = self.padding(0)
        out["image"][:height, :width] = transforms.normalize(pixels, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
        out["label"][:] = label
        out["image_size"][:] = (height, width)
        return out

    def padding(self, bucket: int) -> dict:
        """The empty slot: a zero `input_size` image, a `label_size` label all ignored (one bucket)."""
        return _empty(self.input_size, self.label_size)


def eval_sizes(dataset: SemanticSet, scale: tuple[int, int], stride: int = 32) -> tuple[tuple[int, int], tuple[int, int]]:
    """(input size, label size) of the eval pass: the resized size padded up to a multiple of
    `stride`, and the original size. ValueError naming two images of different sizes."""
    sizes = {}
    for record in dataset.records:
        size = (record.height, record.width)
        if not all(size):
            with Image.open(record.image_path) as image:  # reads the header only
                size = (image.height, image.width)
        sizes.setdefault(size, record.image_path)
        if len(sizes) > 1:
            (a, path_a), (b, path_b) = sizes.items()
            raise ValueError(
                f"Whole-image evaluation batches images of one size, but {path_a} is {a[0]}x{a[1]} and {path_b} is "
                f"{b[0]}x{b[1]}. Evaluate a set of one image size (Cityscapes: 1024x2048).")
    (height, width), = sizes
    resized = rescale_size(height, width, tuple(scale))
    return _padded(resized, stride), (height, width)


def _padded(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """`(h, w)` rounded up to multiples of `stride`: the eval pass's padded input size."""
    return tuple(-(-n // stride) * stride for n in size)


def preprocess_image(config: ml_collections.ConfigDict, image: Image.Image, stride: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A photo as evaluation sees an image (`EvalTransform`, `config` the `data` sub-config):
    `(inputs [1, H, W, 3] float32, display [H, W, 3] uint8)`, resized keeping its aspect ratio to
    `config.scale`, ImageNet-normalised and zero-padded at the bottom and right to a multiple of
    `stride`, as the eval pass pads; `display` is the resized photo, padded black alike."""
    rgb = image.convert("RGB")
    height, width = rescale_size(rgb.height, rgb.width, tuple(config.scale))
    pixels = np.asarray(rgb.resize((width, height), Image.BILINEAR) if (height, width) != (rgb.height, rgb.width) else rgb)
    padded = _padded((height, width), stride)
    inputs = np.zeros((1, *padded, 3), np.float32)
    inputs[0, :height, :width] = transforms.normalize(pixels, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
    display = np.zeros((*padded, 3), np.uint8)
    display[:height, :width] = pixels
    return inputs, display


def check_labels(dataset: SemanticSet, *, sample: int | None = None) -> int:
    """Reads the label maps of `dataset` (all, or `sample` spread over it) as training and evaluation
    will, so a bad one (size, mode, values: `read_label`) stops the run before its first step, not at
    its first evaluation. A file that fails to decode is left to the pipeline, which skips and
    counts it. Returns the number of label maps read."""
    records = [r for r in dataset.records if r.label_path]  # painted maps hold their classes by construction
    if sample is not None and sample < len(records):
        records = [records[i * len(records) // sample] for i in range(sample)]
    for record in records:
        try:
            height, width = record.height, record.width
            if not (height and width):
                with Image.open(record.image_path) as image:  # reads the header only
                    height, width = image.height, image.width
            read_label(record, height, width, dataset.num_classes)
        except (OSError, SyntaxError):
            continue
    return len(records)


def examples(dataset: SemanticSet, config: ml_collections.ConfigDict, *, train: bool) -> Examples:
    """`dataset` as the pipeline's `Examples` (one bucket, `DefaultSampler`), `config` the `data`
    sub-config. Train: `TrainTransform` with its `scale`, `ratio_range`, `crop_size`,
    `cat_max_ratio`, `flip_prob`, `photometric`. Eval: `EvalTransform` at `scale`, sizes from
    `eval_sizes` (ValueError if the images differ in size)."""
    if train:
        transform = TrainTransform(dataset.num_classes, tuple(config.scale), tuple(config.ratio_range),
                                   tuple(config.crop_size), config.cat_max_ratio, config.flip_prob, config.photometric)
    else:
        input_size, label_size = eval_sizes(dataset, tuple(config.scale))
        transform = EvalTransform(dataset.num_classes, tuple(config.scale), input_size, label_size)
    return Examples(dataset.records, transform, transform.padding, dataset.num_classes)
