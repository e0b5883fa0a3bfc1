"""Input pipelines for the three tasks, host side: numpy, PIL and grain; jax only inside the
functions that ask it for the process index, so that grain's worker processes never import it.

Its modules, by job (shared first, then each task's):
  registry          every dataset, by task and name (`DATASETS[task][name]`, `get(task, name)`)
  pipeline          the one grain core: `Examples` (records, preprocess, padding, sampler),
                    `train_stream`, `eval_pass`, the `DefaultSampler` and the size-bucket `GroupSampler`
  transforms        per-image operations every task shares (resize, crop, flip, normalise, decode)
  classification:   `create_split` (this file) and the datasets `digits`, `fashion_mnist`, `imagenet`,
                    `synthetic`
  detection:        `coco` (reading and validating COCO instance files), `coco_transforms` (mmdet's
                    per-image transforms and the size buckets), `masks` (instance masks: validity,
                    decoding, box crops, pasting), `coco_files` (the one COCO writer), and the written
                    datasets `shapes` (synthetic) and `nuclei` (a real sample)
  segmentation:     `semantic` (mmseg's transforms, whole-image eval), `semantic_records` (an image and
                    its label map), `cityscapes` (the official layout and its label ids)

Classification, `create_split(config.data, train=..., batch_size=..., seed=...)` -> `Split`:

    split = cvolution_jax.data.create_split(config.data, train=True, batch_size=128, seed=0)
    it = iter(split.dataset)
    batch = next(it)   # {"image": f32 [128, H, W, C], "label": i32 [128], "valid": f32 [128],
                       #  "corrupt": i32 [128]}
    state = it.get_state()   # JSON-serialisable; `it.set_state(state)` resumes exactly here

Its datasets, by `config.name` (see `default_config` for every field):
  digits         scikit-learn's 1797 8x8 digits, fixed stratified split (no files needed)
  fashion_mnist  60000/10000 28x28 from the Debian package dataset-fashion-mnist
  imagenet       ILSVRC2012 from an ImageFolder tree or tensorflow-datasets (user-provided)
  synthetic      random images for benchmarks

`preprocess_image(config, image)` gives one PIL image as dataset `config.name`'s evaluation sees
its data (each dataset module's own `preprocess_image`).

`batch_size` is per process; the global batch is `batch_size * process_count`. Each batch's
`valid` is 1 for a real example and 0 for eval padding or an image that failed to decode;
losses and metrics must weight examples by it. `corrupt` marks the decode failures so the
training and evaluation loops can count them (evaluation reports its metrics over the images
that decoded, and how many did not).
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import ml_collections

from cvolution_jax.data import pipeline, registry

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The `data` sub-config with every field; each dataset reads only the fields it needs."""
    config = ml_collections.ConfigDict()
    config.name = "digits"  # one of registry.DATASETS["classification"]: digits, fashion_mnist, imagenet, synthetic
    config.image_size = 32  # output height = width in pixels (224 for ImageNet)
    config.num_workers = 0  # grain worker processes per host; 0 decodes in the main process
    config.num_threads = 4  # threads per process (main or worker), each building one batch at a time
    # digits
    config.test_fraction = 0.2  # share of the 1797 images in the fixed stratified test split
    # fashion_mnist
    config.path = "/usr/share/datasets/fashion-mnist"  # folder of the four *-ubyte.gz idx files
    config.translate_pixels = 4  # train augmentation: random translation by up to this many pixels (and flips)
    config.validation_size = 0  # > 0: train on 60000 - N images, evaluate on the N held out (not the test set)
    # imagenet
    config.source = "imagefolder"  # "imagefolder" (data_dir/{train,val}/<wnid>/*.JPEG) or "tfds"
    config.data_dir = ""  # imagefolder: the tree's root; tfds: its data_dir ("" = tfds default)
    config.manual_dir = ""  # tfds: folder holding ILSVRC2012_img_{train,val}.tar ("" = tfds default)
    # synthetic
    config.num_classes = 1000  # labels are drawn from [0, num_classes)
    config.num_examples = 1024  # size of the (fixed) synthetic dataset
    return config


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset, ready for the training or evaluation loop.

    Attributes:
      dataset: `iter(dataset)` gives a grain DatasetIterator (with `get_state`/`set_state`)
        of batches {"image": float32 [b, H, W, C], "label": int32 [b], "valid": float32 [b],
        "corrupt": int32 [b]}, b the per-process batch size. Train: infinite. Eval: one pass,
        the same number of batches in every process.
      num_examples: real examples in the split over all processes (before padding/dropping).
      num_classes: labels are in [0, num_classes).
      image_shape: (H, W, C) of the images.
    """

    dataset: grain.IterDataset
    num_examples: int
    num_classes: int
    image_shape: tuple[int, int, int]


def create_split(
    config: ml_collections.ConfigDict,
    *,
    train: bool,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Split:
    """Builds this process's input pipeline for one split.

    Args:
      config: the `data` sub-config (fields in `default_config`).
      train: True: infinite stream of this process's shard, reshuffled every epoch, augmented,
        bit-for-bit reproducible from `seed`. False: one unshuffled pass, padded to whole
        batches with valid-0 examples; over all processes every example appears exactly once.
      batch_size: examples per batch in THIS process.
      seed: shuffling and augmentation seed (a non-negative int). It never changes which
        examples form a split.
      process_index, process_count: this process's place among the data-parallel processes;
        default `jax.process_index()` / `jax.process_count()`.
    """
    examples = registry.get("classification", config.name).create(config, train=train, seed=seed)
    options = dict(batch_size=batch_size, process_index=process_index, process_count=process_count,
                   num_workers=config.num_workers, num_threads=config.num_threads)
    dataset = pipeline.train_stream(examples, seed=seed, **options) if train else pipeline.eval_pass(examples, **options)
    image_shape = examples.padding(0)["image"].shape  # one bucket: every image has the empty slot's shape
    log.info("%s %s: %d examples, %d classes, images %s.", config.name, "train" if train else "eval",
             len(examples.records), examples.num_classes, image_shape)
    return Split(dataset=dataset, num_examples=len(examples.records), num_classes=examples.num_classes,
                 image_shape=image_shape)


def preprocess_image(config: ml_collections.ConfigDict, image) -> tuple:
    """One PIL image as dataset `config.name`'s evaluation sees its data (`config` the `data` sub-config):
    `(inputs [1, H, W, C] float32, display [H, W, 3] uint8)`, `display` what the model saw, as pixels."""
    return registry.get("classification", config.name).preprocess_image(config, image)


__all__ = ["Split", "create_split", "default_config", "preprocess_image"]
