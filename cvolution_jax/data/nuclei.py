"""A real instance-segmentation sample: fluorescent nuclei, tiled into COCO files with RLE masks.

    paths = write_nuclei("/tmp/nuclei")          # fetches the stardist wheel into /tmp/nuclei/wheel
    train = coco.load_coco(**paths["train"])     # {"annotation_file": ..., "image_dir": ...}

    python -m experiments.data.nuclei --out /tmp/nuclei [--wheel PATH]

Source: the PyPI wheel `stardist==0.9.2` ships one real 2-D sample, `stardist/data/images/
img2d.tif` (512 x 512 fluorescence microscopy image of stained nuclei, uint16, TIFF mode I;16,
values 0..235) and `stardist/data/images/mask2d.tif` (its instance label map, same mode: 0 =
background, 125 nuclei with ids up to 183). stardist's `test_image_nuclei_2d` says the image is
from the 2018 Kaggle Data Science Bowl (Caicedo et al., Nature Methods 16, 2019). The wheel's
METADATA says `License: BSD-3-Clause` (its LICENSE.txt: BSD 3-Clause, (c) 2018-2025 Uwe Schmidt,
Martin Weigert); it states no separate licence for the two data files. The TIFFs are read
straight out of the wheel (a zip) with PIL: no stardist, no tifffile. Every platform's wheel
holds the same data files, so any of them works.

Why: the shapes data set (`shapes.py`) checks the detection stack end to end but is drawn by us;
this sample checks it on real, touching, irregular objects while staying small enough for a CPU.

Split (no image pixel of val is in train):
    train  117 tiles of TILE x TILE = 128 x 128, stride STRIDE = 32, cut from columns
           x in [0, 384): 13 rows (y0 = 0, 32, ..., 384) x 9 columns (x0 = 0, 32, ..., 256).
    val    1 image, the right-most VAL_WIDTH = 128 columns, x in [384, 512): 512 (H) x 128 (W).
On the real data (125 nuclei of 25..751 px, median 440): train 1199 annotations in the 117
tiles, 1150 nuclei + 49 crowd fragments, views of the 102 distinct nuclei with pixels in
x < 384 (5..16 per tile); val 30 nuclei, no crowd fragment. The 7 nuclei that cross x = 384
appear partly in both splits (each split sees only its own pixels). Writing takes ~3 s on a CPU.

Each crop's annotations: one per label present in it, describing its VISIBLE part: compressed
RLE `segmentation`, `area` (pixel count), tight `bbox` [x, y, w, h] (w = max col - min col + 1),
category 1 "nucleus". A nucleus cut by a tile or region border that keeps fewer than MIN_AREA
visible pixels is `iscrowd` 1: COCOeval ignores detections matched to crowd regions and
`coco.load_coco` skips crowds for training, so a sliver neither trains nor counts as a miss.
Nuclei that are whole in the crop stay `iscrowd` 0 whatever their size.

Pixels: the image is scaled to uint8 by its own percentiles PERCENTILES = (1, 99.8), taken
over the whole 512 x 512 image (so tiles share one scale), clipped, and saved as RGB PNG with
the gray value in all three channels (the detection pipeline expects RGB).

Layout under `out_dir` (that of `coco_files.split_paths`):
    train/000000.png ...                 tile i (row-major) is image id i + 1; `crop` in its
                                         image entry is [x0, y0, w, h] in the 512 x 512 original
    val/000000.png                       image id 1
    annotations/instances_train.json     COCO instances
    annotations/instances_val.json
    wheel/stardist-0.9.2-*.whl           only when `write_nuclei` fetched it
"""

from __future__ import annotations

import glob
import io
import logging
import os
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image

from cvolution_jax.data.coco_files import is_complete, split_paths, write_split

log = logging.getLogger(__name__)

# Bump when the content or the files change, so `write_nuclei` regenerates old copies.
FORMAT_VERSION = 1
STARDIST_VERSION = "0.9.2"
IMAGE_MEMBER = "stardist/data/images/img2d.tif"
LABELS_MEMBER = "stardist/data/images/mask2d.tif"
IMAGE_SIZE = 512  # both TIFFs are IMAGE_SIZE x IMAGE_SIZE; the tiling below assumes it

TILE = 128  # train tile side, pixels
STRIDE = 32  # train tile step, pixels: neighbouring tiles overlap by TILE - STRIDE
VAL_WIDTH = 128  # the held-out strip: columns [IMAGE_SIZE - VAL_WIDTH, IMAGE_SIZE), all rows
MIN_AREA = 16  # a border-cut fragment with fewer visible pixels becomes a crowd region
PERCENTILES = (1.0, 99.8)  # intensity range mapped to 0..255
CATEGORY = "nucleus"  # COCO category id 1

# Fallback when pip finds no wheel for this interpreter/platform: the data files are the same
# in every wheel. manylinux2014 (glibc 2.17) is too old a tag: the Linux wheels are 2_28.
_FALLBACK_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")


def fetch_wheel(dest_dir: str | os.PathLike) -> str:
    """Path of a `stardist-0.9.2-*.whl` in `dest_dir`, downloaded with pip unless one is there.

    Tries this interpreter's platform first, then a manylinux x86_64 CPython 3.11 wheel (any
    platform's wheel holds the same data). Raises RuntimeError with pip's error output when
    both fail (no network, no such release, ...).
    """
    dest_dir = os.fspath(dest_dir)
    existing = _find_wheel(dest_dir)
    if existing:
        return existing
    os.makedirs(dest_dir, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", f"stardist=={STARDIST_VERSION}", "--no-deps",
            "--only-binary=:all:", "-d", dest_dir]
    errors = []
    for extra in ((), _FALLBACK_PLATFORM):
        result = subprocess.run(base + list(extra), capture_output=True, text=True)
        wheel = _find_wheel(dest_dir)
        if result.returncode == 0 and wheel:
            log.info("nuclei: downloaded %s.", wheel)
            return wheel
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        errors.append(f"$ {' '.join(base[2:] + list(extra))}\n{tail}")
    raise RuntimeError(
        f"Could not download the stardist=={STARDIST_VERSION} wheel into {dest_dir} with pip:\n"
        + "\n".join(errors)
        + f"\nExpected a file stardist-{STARDIST_VERSION}-*.whl (any platform's wheel will do). Download one by "
        f"hand from https://pypi.org/project/stardist/{STARDIST_VERSION}/#files and pass its path "
        f"(write_nuclei(..., wheel=PATH), --wheel PATH, or --config.data.wheel=PATH for experiments.coco), or put it in {dest_dir}."
    )


def _find_wheel(dest_dir: str) -> str | None:
    wheels = sorted(glob.glob(os.path.join(glob.escape(dest_dir), f"stardist-{STARDIST_VERSION}-*.whl")))
    return wheels[0] if wheels else None


def read_sample(wheel_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The sample image and its instance labels, read from the stardist wheel (a zip).

    Returns (image float32 [512, 512], the raw intensities; labels int32 [512, 512], 0 =
    background, k > 0 = nucleus k). Raises ValueError if the file is not a zip, lacks the two
    TIFF members, or they are not single-channel 512 x 512 images.
    """
    wheel_path = os.fspath(wheel_path)
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            names = archive.namelist()
            missing = [member for member in (IMAGE_MEMBER, LABELS_MEMBER) if member not in names]
            if missing:
                held = [name for name in names if name.startswith("stardist/data/")] or names
                raise ValueError(
                    f"{wheel_path} lacks {', '.join(missing)}; it holds {len(names)} files, e.g. "
                    f"{', '.join(held[:8])}. Expected the stardist=={STARDIST_VERSION} wheel "
                    f"(stardist-{STARDIST_VERSION}-*.whl from PyPI, any platform); pass that file."
                )
            image, labels = (_read_tiff(archive, member, wheel_path) for member in (IMAGE_MEMBER, LABELS_MEMBER))
    except zipfile.BadZipFile as error:
        raise ValueError(
            f"{wheel_path} is not a zip file ({error}); expected the stardist=={STARDIST_VERSION} wheel "
            f"(stardist-{STARDIST_VERSION}-*.whl). Download it again or pass the right path."
        ) from error
    if labels.min() < 0:
        raise ValueError(f"{wheel_path}:{LABELS_MEMBER} has negative labels; expected 0 (background) and k > 0.")
    return image.astype(np.float32), labels.astype(np.int32)


def _read_tiff(archive: zipfile.ZipFile, member: str, wheel_path: str) -> np.ndarray:
    with Image.open(io.BytesIO(archive.read(member))) as image:
        array = np.asarray(image)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{wheel_path}:{member} has shape {array.shape}; expected a single-channel {IMAGE_SIZE} x "
            f"{IMAGE_SIZE} image, as in the stardist=={STARDIST_VERSION} wheel. Pass that wheel."
        )
    return array


def write_nuclei(out_dir: str | os.PathLike, wheel: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """Writes (or finds already written) the tiled nuclei sample under `out_dir`.

    `wheel`: the stardist 0.9.2 wheel; None fetches it into `<out_dir>/wheel/` (no network if
    a wheel is already there). Idempotent: when both splits' annotation files exist with this
    module's `info` block and all their images exist, returns at once without reading any wheel
    (so a different `wheel` into the same `out_dir` changes nothing: delete `out_dir` first).
    Each split is written like `shapes.write_shapes` does: annotation file removed first,
    images into a temporary folder renamed into place, annotation file written last and
    atomically as the completion marker. One process at a time per `out_dir`.

    Returns {"train": {"annotation_file": path, "image_dir": path}, "val": {...}}, the keyword
    arguments of `coco.load_coco`.
    """
    out_dir = os.fspath(out_dir)
    paths = {split: split_paths(out_dir, split) for split in ("train", "val")}
    todo = [split for split in paths if not is_complete(**paths[split], info=_info(split))]
    for split in paths:
        if split not in todo:
            log.info("nuclei %s: %s is up to date; nothing to write.", split, paths[split]["annotation_file"])
    if not todo:
        return paths

    if wheel is None:
        wheel = fetch_wheel(os.path.join(out_dir, "wheel"))
    image, labels = read_sample(wheel)
    pixels = to_rgb_uint8(image)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    for split in todo:
        _write_split(out_dir, split, pixels, labels, crops(split))
    return paths


def crops(split: str) -> list[tuple[int, int, int, int]]:
    """The split's crops of the 512 x 512 original as (x0, y0, w, h), in image-id order."""
    train_width = IMAGE_SIZE - VAL_WIDTH
    if split == "train":
        return [(x0, y0, TILE, TILE)
                for y0 in range(0, IMAGE_SIZE - TILE + 1, STRIDE)
                for x0 in range(0, train_width - TILE + 1, STRIDE)]
    if split == "val":
        return [(train_width, 0, VAL_WIDTH, IMAGE_SIZE)]
    raise ValueError(f"nuclei: unknown split {split!r}; expected 'train' or 'val'.")


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: `image` [H, W] mapped from its PERCENTILES range to 0..255, gray in RGB."""
    low, high = np.percentile(image, PERCENTILES)
    # A flat image would divide by zero; it then maps to 0 everywhere.
    scaled = (image.astype(np.float64) - low) / max(high - low, 1e-12)
    gray = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _info(split: str) -> dict:
    # Everything the content depends on; a mismatch with the file on disk means regenerate.
    return {
        "description": "cvolution_jax nuclei sample (cvolution_jax.data.nuclei)",
        "format_version": FORMAT_VERSION,
        "split": split,
        "source": f"stardist=={STARDIST_VERSION} wheel: {IMAGE_MEMBER}, {LABELS_MEMBER}",
        "tile": TILE,
        "stride": STRIDE,
        "val_width": VAL_WIDTH,
        "min_area": MIN_AREA,
        "percentiles": list(PERCENTILES),
    }


def _write_split(out_dir: str, split: str, pixels: np.ndarray, labels: np.ndarray,
                 split_crops: list[tuple[int, int, int, int]]) -> None:
    # Whole-image pixel count per label: a crop that shows fewer pixels has cut the nucleus.
    full_area = np.bincount(labels.ravel())

    def examples():
        for x0, y0, width, height in split_crops:
            crop = labels[y0:y0 + height, x0:x0 + width]
            objects = []
            for label in np.unique(crop[crop > 0]):
                visible = crop == label
                area = int(visible.sum())
                objects.append((1, visible, {"iscrowd": int(area < full_area[label] and area < MIN_AREA)}))
            yield pixels[y0:y0 + height, x0:x0 + width], {"crop": [x0, y0, width, height]}, objects

    categories = [{"id": 1, "name": CATEGORY, "supercategory": "cell"}]
    content = write_split(out_dir, split, _info(split), categories, examples())
    crowd = sum(a["iscrowd"] for a in content["annotations"])
    log.info("nuclei %s: wrote %d images, %d nuclei + %d crowd fragments (< %d px, cut by a border) to %s.",
             split, len(content["images"]), len(content["annotations"]) - crowd, crowd, MIN_AREA,
             split_paths(out_dir, split)["image_dir"])
