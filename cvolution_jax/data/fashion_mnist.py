"""Fashion-MNIST (Xiao et al. 2017): 60000 train / 10000 test grey 28x28 images, 10 classes.

Read straight from the four idx files, gzipped, as the Debian package `dataset-fashion-mnist`
installs them in /usr/share/datasets/fashion-mnist (no download at run time).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os

import ml_collections
import numpy as np
from PIL import Image

from cvolution_jax.data import transforms
from cvolution_jax.data.pipeline import ArrayRecords, Example, Examples, ImagePadding, example

NUM_CLASSES = 10
SIZE = 28
# Pixel mean and std of the 60000 training images on the 0..255 scale.
MEAN = 72.94035
STD = 90.02118
VALIDATION_SEED = 0  # fixes which training images `validation_size` holds out, whatever the run's seed

_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_MAGIC = {2051: 3, 2049: 1}  # idx magic number -> number of dimensions (uint8 data)


def read_idx(path: str) -> np.ndarray:
    """Reads a gzipped idx file of uint8 data: images -> [N, 28, 28], labels -> [N]."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic not in _IDX_MAGIC:
        raise ValueError(
            f"{path} is not an idx file of uint8 images or labels (magic number {magic}, expected "
            f"2051 or 2049). Reinstall it with `apt-get install --reinstall dataset-fashion-mnist`."
        )
    ndim = _IDX_MAGIC[magic]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != np.prod(shape):
        raise ValueError(
            f"{path} holds {len(data) - offset} bytes of data but its header says {shape}: the "
            f"file is truncated. Reinstall it with `apt-get install --reinstall dataset-fashion-mnist`."
        )
    # A view of `bytes`, hence read-only: safe to share through `load`'s cache.
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=None)
def load(path: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the train (N=60000) or test (10000) split."""
    paths = [os.path.join(path, name) for name in _FILES[train]]
    for file in paths:
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"Fashion-MNIST file {file} is missing. Install the Debian package with "
                f"`apt-get install dataset-fashion-mnist` (it puts the files in "
                f"/usr/share/datasets/fashion-mnist), or set data.path to a folder holding "
                f"{', '.join(_FILES[True] + _FILES[False])}."
            )
    images, labels = (read_idx(file) for file in paths)
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels.")
    return images, labels


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """(image uint8 [28, 28], label) -> example with image float32 [size, size, 1], normalised;
    training examples are translated at random by up to `translate_pixels` (at output size) and
    flipped left-right with probability 1/2."""

    image_size: int
    translate_pixels: int = 4

    def __call__(self, record: tuple[np.ndarray, int], rng: np.random.Generator | None) -> Example:
        image, label = record
        image = transforms.resize_square(image, self.image_size)[..., None]
        if rng is not None:
            image = transforms.random_flip(transforms.pad_and_random_crop(image, self.translate_pixels, rng), rng)
        return example(transforms.normalize(image, MEAN, STD), label)


def validation_indices(num_train: int, validation_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of the `num_train` training images: `validation_size`
    of them drawn at random (fixed by `VALIDATION_SEED`) form the validation split, the rest train.
    Both sorted."""
    if not 0 <= validation_size < num_train:
        raise ValueError(
            f"data.validation_size must be in [0, {num_train}) (training images held out for validation; 0 "
            f"evaluates on the test set); got {validation_size}.")
    held_out = np.zeros(num_train, bool)
    held_out[np.random.default_rng(VALIDATION_SEED).permutation(num_train)[:validation_size]] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def create(config: ml_collections.ConfigDict, *, train: bool, seed: int) -> Examples:
    """The train or test split from `config.path`, resized to `config.image_size` if not 28.

    With `config.validation_size` N > 0, N training images (`validation_indices`) are held out:
    training reads the other 60000 - N and evaluation reads those N instead of the test set, so a
    recipe can be chosen without looking at the test images.
    """
    del seed  # the data does not depend on the training seed
    translate_pixels = config.get("translate_pixels", 4)
    if not isinstance(translate_pixels, int) or translate_pixels < 0:
        raise ValueError(f"data.translate_pixels must be an int >= 0 (0: flips only); got {translate_pixels!r}.")
    validation_size = config.get("validation_size", 0)
    images, labels = load(os.path.expanduser(config.path), train or validation_size > 0)
    if validation_size:  # a negative size is refused by validation_indices
        kept = validation_indices(len(labels), validation_size)[0 if train else 1]
        images, labels = images[kept], labels[kept]
    return Examples(
        records=ArrayRecords(images, labels),
        preprocess=Preprocess(config.image_size, translate_pixels),
        padding=ImagePadding((config.image_size, config.image_size, 1)),
        num_classes=NUM_CLASSES,
    )


def preprocess_image(config: ml_collections.ConfigDict, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """A photo as this dataset's eval input: `(inputs [1, S, S, 1] float32, display [S, S, 3] uint8)`:
    its central square, grey, resized to `config.image_size` and normalised with `MEAN` and `STD`."""
    return transforms.grey_eval_image(image, config.image_size, 255.0, MEAN, STD)
