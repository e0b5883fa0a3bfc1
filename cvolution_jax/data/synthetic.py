"""Random images and labels for benchmarks: no files, no decoding, deterministic from the seed.

Example i is drawn from a generator seeded by (seed, i), so it is the same in the train and
eval splits and in every process and worker; train only shuffles (there is no augmentation).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from cvolution_jax.data.imagenet import preprocess_image  # noqa: F401  random images stand in for ImageNet's
from cvolution_jax.data.pipeline import Example, Examples, ImagePadding, example


@dataclasses.dataclass(frozen=True)
class Records:
    """Record i is the example index i itself; `Preprocess` turns it into pixels."""

    num_examples: int

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"synthetic example {index} out of range [0, {self.num_examples}).")
        return index


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Index -> example with image float32 [size, size, 3] ~ N(0, 1) (already "normalised")."""

    image_size: int
    num_classes: int
    seed: int

    def __call__(self, index: int, rng: np.random.Generator | None) -> Example:
        del rng  # the content must not depend on the epoch: it is a fixed dataset
        content = np.random.default_rng((self.seed, index))
        label = content.integers(self.num_classes)
        image = content.standard_normal((self.image_size, self.image_size, 3), np.float32)
        return example(image, label)


def create(config: ml_collections.ConfigDict, *, train: bool, seed: int) -> Examples:
    """`config.num_examples` random examples of `config.num_classes` classes."""
    del train  # same examples in both splits
    if config.num_examples < 1 or config.num_classes < 1:
        raise ValueError(
            f"synthetic data needs num_examples >= 1 and num_classes >= 1, got "
            f"{config.num_examples} and {config.num_classes}."
        )
    return Examples(
        records=Records(config.num_examples),
        preprocess=Preprocess(config.image_size, config.num_classes, seed),
        padding=ImagePadding((config.image_size, config.image_size, 3)),
        num_classes=config.num_classes,
    )
