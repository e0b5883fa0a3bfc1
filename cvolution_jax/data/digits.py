"""UCI handwritten digits as shipped by scikit-learn: 1797 grey 8x8 images, values 0..16, 10 classes.

There is no official test set, so this module fixes one: a stratified split with its own seed
(`SPLIT_SEED`), identical for every training seed, so runs with different seeds evaluate on
the same images.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections
import numpy as np
from PIL import Image

from cvolution_jax.data import transforms
from cvolution_jax.data.pipeline import ArrayRecords, Example, Examples, ImagePadding, example

NUM_CLASSES = 10
SPLIT_SEED = 0  # fixed on purpose: independent of the training seed
TRANSLATE_PIXELS = 2  # train augmentation: random translation by up to this, at output size


@functools.lru_cache(maxsize=None)
def _load() -> tuple[np.ndarray, np.ndarray]:
    # scikit-learn is heavy to import; only this dataset needs it, and grain's worker
    # processes never do (they receive the arrays).
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)  # [1797, 8, 8], 0..16
    labels = digits.target.astype(np.int32)  # [1797]
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller of the cache
    return images, labels


@functools.lru_cache(maxsize=None)
def split_indices(test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into `load_digits()`, each sorted; stratified by class, seed fixed."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}.")
    _, labels = _load()
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=SPLIT_SEED
    )
    train, test = np.sort(train), np.sort(test)
    train.flags.writeable = test.flags.writeable = False
    return train, test


def statistics(test_fraction: float) -> tuple[float, float]:
    """Mean and std of the train split's pixels on the raw 0..16 scale (normalisation constants).

    Computed rather than written down because they depend on `test_fraction`.
    """
    images, _ = _load()
    train_pixels = images[split_indices(test_fraction)[0]].astype(np.float64)
    return float(train_pixels.mean()), float(train_pixels.std())


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """(image [8, 8] 0..16, label) -> example with image float32 [size, size, 1], normalised."""

    image_size: int
    mean: float
    std: float

    def __call__(self, record: tuple[np.ndarray, int], rng: np.random.Generator | None) -> Example:
        image, label = record
        image = transforms.resize_square(image, self.image_size)[..., None]
        if rng is not None:
            # Translation only: a mirrored digit is a different (or no) digit.
            image = transforms.pad_and_random_crop(image, TRANSLATE_PIXELS, rng)
        return example(transforms.normalize(image, self.mean, self.std), label)


def create(config: ml_collections.ConfigDict, *, train: bool, seed: int) -> Examples:
    """The train or test split of digits, resized to `config.image_size` (bilinear)."""
    del seed  # the split is fixed by SPLIT_SEED, not by the training seed
    images, labels = _load()
    train_idx, test_idx = split_indices(config.test_fraction)
    idx = train_idx if train else test_idx
    mean, std = statistics(config.test_fraction)
    return Examples(
        records=ArrayRecords(images[idx], labels[idx]),
        preprocess=Preprocess(config.image_size, mean, std),
        padding=ImagePadding((config.image_size, config.image_size, 1)),
        num_classes=NUM_CLASSES,
    )


def preprocess_image(config: ml_collections.ConfigDict, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """A photo as this dataset's eval input: `(inputs [1, S, S, 1] float32, display [S, S, 3] uint8)`.

    Digits are light strokes on a dark background on the raw 0..16 scale: the photo's central
    square, grey, is scaled to 0..16, resized to `config.image_size` and normalised with the
    split's statistics.
    """
    mean, std = statistics(config.test_fraction)
    return transforms.grey_eval_image(image, config.image_size, 16.0, mean, std)
