"""Pictures of semantic segmentation: the image, its ground truth and the prediction side by
side, label maps in the Cityscapes palette (mmseg's `CityscapesDataset.PALETTE`).

Class i takes colour i of the palette (datasets with fewer classes take its first colours);
ignored pixels (255) are black.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from cvolution_jax.data.transforms import denormalize_image
from cvolution_jax.files import atomic_open

CITYSCAPES_PALETTE = np.asarray([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
    """uint8 `[H, W]` class ids -> uint8 `[H, W, 3]` RGB; 255 and ids past the palette black."""
    lookup = np.zeros((256, 3), np.uint8)
    lookup[:len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE
    return lookup[np.asarray(label, np.uint8)]


def side_by_side(pixels: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """`[H, W, 3]` image (resized to the labels' size when it differs), colourised ground truth and
    prediction `[H, W]`, as one uint8 `[H, 3W, 3]` picture."""
    height, width = truth.shape
    if pixels.shape[:2] != (height, width):
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
    return np.concatenate([pixels, colorize(truth), colorize(pred)], axis=1)


def draw_batch(batch: dict, pred: np.ndarray, out_dir: str, limit: int, start: int) -> int:
    """Writes up to `limit` pictures of the real slots (valid 1) of an eval `batch` with predictions
    `pred [b, H, W]` as `<out_dir>/image_<start + k>.png`; returns how many."""
    drawn = 0
    for i in np.flatnonzero(np.asarray(batch["valid"]) > 0)[:limit]:
        pixels = denormalize_image(batch["image"][i], batch["image_size"][i])
        picture = side_by_side(pixels, np.asarray(batch["label"][i]), np.asarray(pred[i]))
        os.makedirs(out_dir, exist_ok=True)
        with atomic_open(os.path.join(out_dir, f"image_{start + drawn}.png"), "wb") as f:
            Image.fromarray(picture).save(f, format="PNG")
        drawn += 1
    return drawn
