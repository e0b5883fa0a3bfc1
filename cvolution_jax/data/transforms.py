"""Per-example image operations on numpy arrays and PIL images (host side, no jax).

Every random operation takes a `np.random.Generator` so the caller decides where randomness
comes from; the input pipeline hands each example its own generator, which is what makes the
stream reproducible and resumable.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image

# Per-channel statistics of ImageNet on the 0..255 scale (RGB order).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """`(image - mean) / std` in float32. image: [H, W, C]; mean, std: scalars or [C]."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (np.asarray(image, np.float32) - mean) / std


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's `rescale_size` with keep_ratio: (new_height, new_width).

    factor = min(long_max / max(h, w), short_max / min(h, w)) with long_max, short_max the
    larger and smaller entry of `scale` (e.g. (1333, 800)); sizes round half up.
    """
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a single-channel image. image: [H, W] -> float32 [size, size].

    PIL's mode "F" keeps float32 values, so no 8-bit rounding happens between resize and
    normalisation (digits are 0..16: rounding would be coarse).
    """
    image = np.asarray(image, np.float32)
    if image.shape == (size, size):
        return image
    resized = Image.fromarray(image, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(resized, np.float32)


def pad_and_random_crop(image: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Random translation by up to `pad` pixels: zero-pad by `pad`, crop back to the input size.

    image: [H, W, C] -> [H, W, C]. Zero is the background of the raw digits / Fashion-MNIST
    images, so this runs before normalisation.
    """
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top:top + height, left:left + width]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors image [H, W, C] left-right with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """The crop of torchvision's RandomResizedCrop: `(left, top, crop_width, crop_height)`.

    Draws an area fraction uniformly from `scale` and an aspect ratio (w/h) log-uniformly from
    `ratio`; keeps the first draw that fits inside the image, at a uniform position. After
    `attempts` misfits it falls back to the largest central crop whose ratio is within `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, crop_width, crop_height
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) of an RGB PIL image.

    Returns uint8 [size, size, 3]. Crop and resize are one PIL call (`box=`), which also
    antialiases when the crop is larger than `size`, as torchvision's PIL path does.
    """
    left, top, crop_width, crop_height = random_resized_crop_box(image.width, image.height, rng)
    box = (left, top, left + crop_width, top + crop_height)
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box))


def resize_and_center_crop(image: Image.Image, size: int, resize_size: int) -> np.ndarray:
    """Eval view: shorter side to `resize_size` (bilinear), then the central `size` x `size`.

    Returns uint8 [size, size, 3]. Rounding follows torchvision's Resize(int) + CenterCrop:
    the longer side is truncated, the crop offset rounded.
    """
    width, height = image.size
    if width <= height:
        new_width, new_height = resize_size, int(resize_size * height / width)
    else:
        new_width, new_height = int(resize_size * width / height), resize_size
    resized = image.resize((new_width, new_height), Image.BILINEAR)
    top = int(round((new_height - size) / 2))
    left = int(round((new_width - size) / 2))
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def grey_eval_image(image: Image.Image, size: int, top: float, mean: float, std: float) -> tuple[np.ndarray, np.ndarray]:
    """A photo as a grey dataset's eval input: `(inputs [1, size, size, 1] float32, display [size, size, 3] uint8)`.

    The central square, grey, scaled from 0..255 to the dataset's `0..top`, resized bilinearly to
    `size` (as its eval resizes its own images) and normalised with its `mean` and `std`.
    """
    side = min(image.size)
    left, upper = (image.width - side) // 2, (image.height - side) // 2
    square = image.convert("RGB").crop((left, upper, left + side, upper + side))
    grey = np.asarray(square.convert("L"), np.float32)
    resized = resize_square(grey * (top / 255.0), size)
    display = np.clip(np.round(resized * (255.0 / top)), 0, 255).astype(np.uint8)
    return normalize(resized[..., None], mean, std)[None], np.repeat(display[..., None], 3, axis=-1)


def decode_rgb(encoded: bytes | str | os.PathLike) -> Image.Image:
    """Decodes an image file (a path, or its bytes) fully into an RGB PIL image.

    Raises whatever PIL or the file system raises for an unreadable, corrupt or truncated file.
    PIL opens lazily (only the header is read), so `convert` here forces the whole decode:
    truncation surfaces now, inside the caller's try, not later in a resize. That holds only
    while `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is False (PIL's default), which the ImageNet
    pipeline checks when it is built.
    """
    source = io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded
    with Image.open(source) as image:
        return image.convert("RGB")


def denormalize_image(image, image_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """One normalised model input ``[Hp, Wp, 3]`` -> uint8 ``[h, w, 3]`` RGB pixels.

    Inverts ``(pixels - mean) / std`` (the input pipeline's ``normalize``), rounds and clips to
    ``[0, 255]``, then keeps the top-left ``image_size = (h, w)``: images are padded at the
    bottom and right up to the batch's size bucket. ``image_size=None`` keeps the whole array.
    The image must be in the resolution the model saw; boxes drawn on it are in resized pixels.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image must be one NHWC batch element of shape [H, W, 3]; got {image.shape}. "
            "Index the batch first (batch['image'][i]).")
    pixels = image * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    if image_size is not None:
        height, width = (int(v) for v in image_size)
        if not (0 < height <= image.shape[0] and 0 < width <= image.shape[1]):
            raise ValueError(
                f"image_size (h, w) = {tuple(image_size)} must be positive and fit in the padded "
                f"image {image.shape[:2]}; pass the unpadded size of this image.")
        pixels = pixels[:height, :width]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
