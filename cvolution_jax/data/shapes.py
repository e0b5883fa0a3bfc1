"""A seeded synthetic "shapes" dataset for detection and instance segmentation, in COCO format.

    paths = write_shapes("/tmp/shapes")          # 1000 train + 200 val images, 128 x 128
    train = coco.load_coco(**paths["train"])     # {"annotation_file": ..., "image_dir": ...}

    python -m cvolution_jax.data.shapes --out /tmp/shapes [--num-train N --num-val N
        --image-size S --seed S]

Why: the detection stack needs a data set that a tiny Faster R-CNN learns on a CPU in minutes
(bbox AP50 >= 0.8 on val is the target), that tests can write in a second, and that goes
through exactly the COCO files, loader and pycocotools evaluation that real COCO does.

Layout under `out_dir`:
    train/000000.png ...                 RGB, image_size x image_size
    val/000000.png ...                   the held-out split (its own seed stream)
    annotations/instances_train.json     COCO instances: images, annotations, categories
    annotations/instances_val.json

Content: 3 categories, `rectangle` (id 1), `ellipse` (2), `triangle` (3). Each image has a
textured background (a smooth colour gradient plus faint stripes and pixel noise) and 1 to
`MAX_OBJECTS` shapes of random colour, size (sides `MIN_SIDE`..`MAX_SIDE` x image_size / 128
pixels), aspect ratio and orientation. Shapes may overlap (later ones occlude earlier ones)
and may stick out of the image a little. Colours are drawn to contrast with what they cover,
so every shape is visible; colour says nothing about the class.

Every annotation describes the VISIBLE part of its shape: `segmentation` is the visible mask
as compressed RLE, `area` its pixel count, `bbox` its tight [x, y, w, h]. Shapes are placed so
that each keeps at least `MIN_VISIBLE_FRACTION` of its area and `MIN_VISIBLE_PIXELS` pixels
visible (a placement that would hide too much of an earlier shape is redrawn), so no drawn
shape goes unannotated and every annotation is learnable.

Image i of a split is drawn from `np.random.default_rng((seed, split, i))` alone: the same
arguments give byte-identical files, and train (split 0) and val (split 1) never share a
stream.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np

from cvolution_jax.data.coco_files import is_complete, split_paths, write_split

log = logging.getLogger(__name__)

# Bump when the content or the files change, so `write_shapes` regenerates old copies.
FORMAT_VERSION = 1
CATEGORIES = ("rectangle", "ellipse", "triangle")  # COCO category ids 1, 2, 3
SPLITS = {"train": 0, "val": 1}  # split name -> its seed stream

DEFAULT_NUM_TRAIN = 1000
DEFAULT_NUM_VAL = 200
DEFAULT_IMAGE_SIZE = 128

MAX_OBJECTS = 6
MIN_SIDE, MAX_SIDE = 12, 64  # shape side range in pixels at image_size 128; scales with it
MAX_ASPECT = 2.0  # width / height of a shape's box within [1 / MAX_ASPECT, MAX_ASPECT]
MAX_OUTSIDE = 0.15  # a shape's box may stick out of the image by this share of its side
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 30
MIN_CONTRAST = 90.0  # RGB distance (0..255 scale) between a shape and what it covers
PLACEMENT_ATTEMPTS = 20
COLOUR_ATTEMPTS = 30


def write_shapes(
    out_dir: str | os.PathLike,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> dict[str, dict[str, str]]:
    """Writes (or finds already written) the shapes data set under `out_dir`.

    Idempotent: a split whose annotation file exists with the same generator parameters in its
    `info` block (and whose images all exist) is left alone. A split is written atomically:
    its annotation file is removed first, images go to a temporary folder that is then renamed,
    and the annotation file, written last through a temporary file, marks the split complete;
    a killed run therefore never leaves a split that looks complete. `out_dir/train`,
    `out_dir/val` and `out_dir/annotations/instances_*.json` belong to this function: it
    replaces them when the parameters differ. Only one process may write a given `out_dir` at
    a time (in multi-process runs, let process 0 write and the others wait).

    Returns {"train": {"annotation_file": path, "image_dir": path}, "val": {...}}, the keyword
    arguments of `coco.load_coco`.
    """
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("seed", seed, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"write_shapes: {name} must be an int >= {low}, got {value!r}.")
    if int(image_size) != image_size or image_size < 32:
        raise ValueError(
            f"write_shapes: image_size must be an int >= 32 (smaller images leave no room for shapes of "
            f"{MIN_VISIBLE_PIXELS}+ visible pixels), got {image_size!r}."
        )
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    paths = {}
    for split, num_images in (("train", num_train), ("val", num_val)):
        paths[split] = _write_split(out_dir, split, int(num_images), int(image_size), int(seed))
    return paths


def _info(split: str, num_images: int, image_size: int, seed: int) -> dict:
    # Everything the content depends on; a mismatch with the file on disk means regenerate.
    return {
        "description": "cvolution_jax synthetic shapes (cvolution_jax.data.shapes)",
        "format_version": FORMAT_VERSION,
        "split": split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
    }


def _write_split(out_dir: str, split: str, num_images: int, image_size: int, seed: int) -> dict[str, str]:
    paths = split_paths(out_dir, split)
    info = _info(split, num_images, image_size, seed)
    if is_complete(paths["annotation_file"], paths["image_dir"], info):
        log.info("shapes %s: %s is up to date; nothing to write.", split, paths["annotation_file"])
        return paths

    def examples():
        for index in range(num_images):
            pixels, objects = draw_image(image_size, np.random.default_rng((seed, SPLITS[split], index)))
            yield pixels, {}, [(category_id, visible, {}) for category_id, visible, _ in objects]

    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]
    content = write_split(out_dir, split, info, categories, examples())
    log.info("shapes %s: wrote %d images, %d objects to %s.", split, len(content["images"]),
             len(content["annotations"]), paths["image_dir"])
    return paths


# ------------------------------------------------------------------------------- drawing


def draw_image(image_size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray, int]]]:
    """One image and its objects, drawn from `rng` only.

    Returns (uint8 [S, S, 3], [(category_id, visible mask bool [S, S], full area), ...]) with
    the objects in drawing order; full area counts the whole shape's pixels, hidden or outside
    the image included. Every visible mask meets the visibility thresholds.
    """
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5  # pixel centres
    background = _background(image_size, xx, yy, rng)
    image = background.copy()
    colours: list[np.ndarray] = []
    full_areas: list[int] = []
    visible: list[np.ndarray] = []
    categories: list[int] = []
    scale = image_size / 128
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _attempt in range(PLACEMENT_ATTEMPTS):
            category = int(rng.integers(len(CATEGORIES)))
            shape_mask, full_area = _shape_mask(category, image_size, scale, rng)
            if shape_mask.sum() < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full_area):
                continue  # too much of it outside the image
            # Occluding an earlier shape is fine as long as enough of it stays visible.
            if all(
                (v & ~shape_mask).sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * a)
                for v, a in zip(visible, full_areas)
            ):
                break
        else:
            continue  # no room for another shape: the image keeps fewer
        covered = [background[shape_mask].mean(axis=0)]
        covered += [c for c, v in zip(colours, visible) if (v & shape_mask).any()]
        colour = _contrasting_colour(covered, rng)
        image[shape_mask] = _shade(colour, shape_mask, xx, yy, rng)[shape_mask]
        visible = [v & ~shape_mask for v in visible]
        visible.append(shape_mask)
        colours.append(colour)
        full_areas.append(full_area)
        categories.append(category + 1)
    # Sensor-like noise over everything, so neither shapes nor background are flat colour.
    image += rng.normal(0.0, rng.uniform(2.0, 6.0), image.shape).astype(np.float32)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    # Placement already guarantees the thresholds; the filter keeps that promise explicit.
    objects = [
        (c, v, a) for c, v, a in zip(categories, visible, full_areas)
        if v.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * a)
    ]
    return pixels, objects


def _background(size: int, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 [S, S, 3]: a gentle linear colour gradient plus faint stripes."""
    start = rng.uniform(40.0, 215.0, 3)
    # A small colour change across the image keeps the colour under any shape close to its
    # mean, which the contrast test uses.
    end = np.clip(start + rng.uniform(-50.0, 50.0, 3), 0.0, 255.0)
    angle = rng.uniform(0.0, 2 * np.pi)
    ramp = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5
    image = start + np.clip(ramp, 0.0, 1.0)[..., None] * (end - start)
    image += _stripes(xx, yy, rng, amplitude=rng.uniform(0.0, 12.0))[..., None]
    return image.astype(np.float32)


def _stripes(xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    angle = rng.uniform(0.0, np.pi)
    period = rng.uniform(4.0, 16.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    return amplitude * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)


def _shape_mask(category: int, size: int, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(bool [S, S] in-image mask, pixel area of the whole shape including any part outside)."""
    side = np.exp(rng.uniform(np.log(MIN_SIDE * scale), np.log(MAX_SIDE * scale)))
    aspect = np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))
    low, high = MIN_SIDE * scale, MAX_SIDE * scale
    width = float(np.clip(side * np.sqrt(aspect), low, high))
    height = float(np.clip(side / np.sqrt(aspect), low, high))
    x0 = rng.uniform(-MAX_OUTSIDE * width, size - (1 - MAX_OUTSIDE) * width)
    y0 = rng.uniform(-MAX_OUTSIDE * height, size - (1 - MAX_OUTSIDE) * height)
    # Rasterise over the shape's whole box (which may leave the image) to know its full area.
    left, top = int(np.floor(x0)), int(np.floor(y0))
    right, bottom = int(np.ceil(x0 + width)), int(np.ceil(y0 + height))
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32) + 0.5
    if CATEGORIES[category] == "rectangle":
        inside = (xx >= x0) & (xx < x0 + width) & (yy >= y0) & (yy < y0 + height)
    elif CATEGORIES[category] == "ellipse":
        inside = ((xx - x0) / width * 2 - 1) ** 2 + ((yy - y0) / height * 2 - 1) ** 2 <= 1
    else:
        inside = _triangle(xx, yy, x0, y0, width, height, rng)
    mask = np.zeros((size, size), bool)
    clipped = inside[max(0, -top):size - top, max(0, -left):size - left]
    mask[max(0, top):max(0, top) + clipped.shape[0], max(0, left):max(0, left) + clipped.shape[1]] = clipped
    return mask, int(inside.sum())


def _triangle(xx, yy, x0, y0, width, height, rng) -> np.ndarray:
    """A triangle filling its box: base on one side, apex anywhere on the opposite side."""
    t = rng.uniform(0.0, 1.0)
    x1, y1 = x0 + width, y0 + height
    vertices = {
        0: ((x0 + t * width, y0), (x0, y1), (x1, y1)),  # apex on top
        1: ((x0 + t * width, y1), (x1, y0), (x0, y0)),  # apex at the bottom
        2: ((x0, y0 + t * height), (x1, y1), (x1, y0)),  # apex on the left
        3: ((x1, y0 + t * height), (x0, y0), (x0, y1)),  # apex on the right
    }[int(rng.integers(4))]
    # Inside = on the same side of all three edges (either winding).
    signs = []
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
        signs.append((bx - ax) * (yy - ay) - (by - ay) * (xx - ax))
    signs = np.stack(signs)
    return np.all(signs >= 0, axis=0) | np.all(signs <= 0, axis=0)


def _contrasting_colour(covered: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour at least MIN_CONTRAST from every colour in `covered`, if one is found
    in COLOUR_ATTEMPTS draws; otherwise the draw farthest from them."""
    best, best_distance = None, -1.0
    for _ in range(COLOUR_ATTEMPTS):
        colour = rng.uniform(0.0, 255.0, 3)
        distance = min(float(np.linalg.norm(colour - c)) for c in covered)
        if distance >= MIN_CONTRAST:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _shade(colour, mask, xx, yy, rng) -> np.ndarray:
    """float32 [S, S, 3]: the shape's colour with a soft shading ramp and, sometimes, stripes."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0], 1)
    angle = rng.uniform(0.0, 2 * np.pi)
    ramp = ((xx - cols.mean()) * np.cos(angle) + (yy - rows.mean()) * np.sin(angle)) / extent
    shading = rng.uniform(0.0, 25.0) * ramp
    if rng.random() < 0.3:
        shading = shading + _stripes(xx, yy, rng, amplitude=12.0)
    return (colour + shading[..., None]).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # grain installs a root handler
    paths = write_shapes(
        args.out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed
    )
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
