"""ImageNet (ILSVRC2012) from an ImageFolder tree or from tensorflow-datasets' `imagenet2012`.

Train view: RandomResizedCrop(image_size, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip.
Eval view: shorter side to round(image_size / 0.875) (256 for 224), central image_size crop.
Both normalised with the ImageNet mean/std. Images are decoded with PIL on the host.

A file that fails to decode (corrupt, truncated, not an image, unreadable) never stops a run:
it becomes a zero image with corrupt 1 (so valid 0), and a warning names the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, ImageFile

from cvolution_jax.data import transforms
from cvolution_jax.data.pipeline import Example, Examples, ImagePadding, example

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
EVAL_CROP_FRACTION = 0.875  # eval resizes the shorter side to image_size / 0.875 (224 -> 256)

# A record: (name for messages, path or encoded bytes, label).
Record = tuple[str, Any, int]


@dataclasses.dataclass(frozen=True)
class ImageFolderRecords:
    """Files of `root/<class>/<file>`; record i is (path, path, label)."""

    root: str
    files: list[str]  # relative paths "<class>/<file>", sorted
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Record:
        path = os.path.join(self.root, self.files[index])
        return path, path, int(self.labels[index])


def scan_image_folder(root: str, classes: list[str], *, train: bool) -> ImageFolderRecords:
    """Lists the images under `root/<class>/` for each class folder in `root`.

    Labels are indices into `classes` (the training split's sorted class folders, so train and
    val agree). A class folder in `root` that is not in `classes` is an error, and so is a train
    class folder without images: it would still be a class (an output of the classifier that no
    example teaches). An empty val folder only gets a warning: its class is just not evaluated.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"ImageNet folder {root} does not exist. Expected data.data_dir to hold train/<wnid>/*.JPEG "
            f"and val/<wnid>/*.JPEG (the validation images sorted into class folders)."
        )
    label_of = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for name in sorted(entry.name for entry in os.scandir(root) if entry.is_dir()):
        if name not in label_of:
            raise ValueError(
                f"{os.path.join(root, name)} is a class folder that the training split does not have. "
                f"The val tree must use the train tree's class folder names (wnids)."
            )
        folder_files = sorted(
            entry.name for entry in os.scandir(os.path.join(root, name))
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not folder_files:
            folder = os.path.join(root, name)
            if train:
                raise ValueError(
                    f"Class folder {folder} holds no images (*{', *'.join(IMAGE_EXTENSIONS)}), yet every folder "
                    f"of the train split is a class. Put the class's images in it, or remove the folder (and "
                    f"its val counterpart) to train without that class."
                )
            log.warning("Val class folder %s holds no images; its class is not evaluated.", folder)
        files += [f"{name}/{file}" for file in folder_files]
        labels += [label_of[name]] * len(folder_files)
    if not files:
        raise FileNotFoundError(
            f"No images (*{', *'.join(IMAGE_EXTENSIONS)}) in the class folders of {root}. "
            f"Expected {root}/<wnid>/<image>.JPEG."
        )
    return ImageFolderRecords(root, files, np.asarray(labels, np.int32))


def _image_folder(config: ml_collections.ConfigDict, train: bool) -> tuple[ImageFolderRecords, int]:
    train_root = os.path.join(config.data_dir, "train")
    if not os.path.isdir(train_root):
        raise FileNotFoundError(
            f"ImageNet ImageFolder tree not found: {train_root} does not exist. Set data.data_dir to "
            f"a folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, or use data.source='tfds'."
        )
    # Classes are the train tree's folders, so the label of a wnid does not depend on the split.
    classes = sorted(entry.name for entry in os.scandir(train_root) if entry.is_dir())
    records = scan_image_folder(train_root if train else os.path.join(config.data_dir, "val"), classes, train=train)
    return records, len(classes)


@dataclasses.dataclass(frozen=True)
class TfdsRecords:
    """tfds `imagenet2012` data source read with the image left encoded; record i is
    (file name, JPEG bytes, label)."""

    source: Any  # tfds ArrayRecordDataSource: source[i] -> {"image": bytes, "label", "file_name"}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Record:
        record = self.source[index]
        name = record["file_name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return name, bytes(record["image"]), int(record["label"])


def _tfds(config: ml_collections.ConfigDict, train: bool) -> tuple[TfdsRecords, int]:
    # Optional dependency: only this source needs tensorflow-datasets.
    import tensorflow_datasets as tfds

    # grain reads tfds through random access, which needs the ArrayRecord file format.
    builder = tfds.builder("imagenet2012", data_dir=config.data_dir or None, file_format="array_record")
    # The first call converts the ILSVRC2012 tars in manual_dir (tfds's own checks and messages
    # apply when they are missing); once prepared, it only checks that the files are there.
    # Run it once with one process before a multi-process job: processes do not coordinate here.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=config.manual_dir or None)
    )
    source = builder.as_data_source(
        split="train" if train else "validation",
        # Keep the JPEG bytes: decoding happens in `Preprocess`, where failures are caught.
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    return TfdsRecords(source), builder.info.features["label"].num_classes


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """(name, path or bytes, label) -> example with image float32 [size, size, 3], normalised."""

    image_size: int

    def __call__(self, record: Record, rng: np.random.Generator | None) -> Example:
        name, encoded, label = record
        try:
            image = transforms.decode_rgb(encoded)
        except Exception as error:  # any failure to read one file must not stop the run
            log.warning(
                "Skipping image %s: it could not be decoded (%s: %s). It is a zero image with valid 0.",
                name, type(error).__name__, error,
            )
            return example(np.zeros((self.image_size, self.image_size, 3), np.float32), label, corrupt=True)
        if rng is None:
            resize_size = round(self.image_size / EVAL_CROP_FRACTION)
            pixels = transforms.resize_and_center_crop(image, self.image_size, resize_size)
        else:
            pixels = transforms.random_flip(transforms.random_resized_crop(image, self.image_size, rng), rng)
        return example(transforms.normalize(pixels, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD), label)


def create(config: ml_collections.ConfigDict, *, train: bool, seed: int) -> Examples:
    """The train or validation split from `config.source` ("imagefolder" or "tfds")."""
    del seed  # the data does not depend on the training seed
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (something in this program set it), so "
            "truncated JPEGs would decode silently with grey filler instead of being skipped and "
            "counted. Remove the code that sets it, or set it back to False before building data."
        )
    if config.source == "imagefolder":
        records, num_classes = _image_folder(config, train)
    elif config.source == "tfds":
        records, num_classes = _tfds(config, train)
    else:
        raise ValueError(f"Unknown data.source {config.source!r} for imagenet: use 'imagefolder' or 'tfds'.")
    return Examples(
        records=records,
        preprocess=Preprocess(config.image_size),
        padding=ImagePadding((config.image_size, config.image_size, 3)),
        num_classes=num_classes,
    )


def preprocess_image(config: ml_collections.ConfigDict, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """A photo as the eval split sees its images: `(inputs [1, S, S, 3] float32, display [S, S, 3] uint8)`.

    The shorter side resized to `config.image_size / EVAL_CROP_FRACTION`, the central
    `config.image_size` square cropped and ImageNet-normalised; `display` is that crop.
    """
    size = config.image_size
    pixels = transforms.resize_and_center_crop(image.convert("RGB"), size, round(size / EVAL_CROP_FRACTION))
    return transforms.normalize(pixels, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)[None], pixels
