"""The grain pipelines shared by every dataset: sharding, shuffling, per-example RNG, batching.

A dataset module describes itself as `Examples` (random-access records plus a `preprocess`
function); `train_stream` and `eval_pass` turn that into a `grain.IterDataset` of batches.

Batching happens on the `MapDataset`, before `to_iter_dataset`/`mp_prefetch`: grain's worker
processes then each build whole batches (worker w gets batches w, w + W, ...), so the stream is
the same batch for batch with any `num_workers`, and only finished batches cross process
boundaries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

# One example: {"image": float32 [H, W, C], "label": int32 [], "corrupt": int32 []}.
Example = dict[str, np.ndarray]
Preprocess = Callable[[Any, "np.random.Generator | None"], Example]


@dataclasses.dataclass(frozen=True)
class Examples:
    """A dataset split as the pipeline sees it.

    Attributes:
      records: every record of the split over all processes, random access (`len`, `[i]`).
        Travels to grain's worker processes by pickle, so it holds data or file names, not
        open handles.
      preprocess: `preprocess(record, rng) -> Example`; `rng` is a `np.random.Generator` for
        training (augment with it and nothing else) and None for evaluation (no augmentation).
        Must be picklable: a module-level function or a dataclass instance, not a lambda.
      num_classes: labels are in [0, num_classes).
      image_shape: (H, W, C) of `preprocess`'s images.
    """

    records: Sequence[Any]
    preprocess: Preprocess
    num_classes: int
    image_shape: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class ArrayRecords:
    """In-memory records: record i is `(images[i], labels[i])`. images: [N, ...], labels: [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels; they must pair up.")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def example(image: np.ndarray, label: int, corrupt: bool = False) -> Example:
    """Packs one example with the dtypes the batches promise. image: [H, W, C]."""
    return {
        "image": np.asarray(image, np.float32),
        "label": np.int32(label),
        "corrupt": np.int32(corrupt),
    }


def _with_mask(ex: Example) -> Example:
    # A corrupt image is already a zero image; mask 0 keeps it out of the loss and the metrics.
    return {**ex, "mask": np.float32(1 - ex["corrupt"])}


def _padding(image_shape: tuple[int, int, int]) -> Example:
    return {**example(np.zeros(image_shape, np.float32), 0), "mask": np.float32(0)}


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
    """(global batch number, example ids of the global batch) -> this process's slice, augmented."""

    examples: Examples
    seed: int
    batch_size: int
    process_index: int

    def __call__(self, batch_number: int, example_ids: np.ndarray) -> Example:
        num_examples = len(self.examples.records)
        first = self.process_index * self.batch_size
        rows = []
        for offset in range(first, first + self.batch_size):
            example_id = int(example_ids[offset])
            epoch = (batch_number * len(example_ids) + offset) // num_examples
            # The generator depends on (seed, epoch, example id) only: the same example gets fresh
            # augmentation each epoch, whatever the thread, worker or number of processes.
            rng = np.random.default_rng((self.seed, epoch, example_id))
            rows.append(_with_mask(self.examples.preprocess(self.examples.records[example_id], rng)))
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
    """Position in this process's padded pass -> example with mask (padding past the shard)."""

    examples: Examples
    process_index: int
    process_count: int

    def __call__(self, position: int) -> Example:
        example_id = self.process_index + position * self.process_count
        if example_id >= len(self.examples.records):
            return _padding(self.examples.image_shape)
        return _with_mask(self.examples.preprocess(self.examples.records[example_id], None))


def _shuffle_seed(seed: int) -> int:
    # grain's shuffle seeds epoch e with `seed + e`, so seeds 0 and 1 would share permutations
    # one epoch apart; hashing the seed into 32 bits keeps runs unrelated.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def train_stream(
    examples: Examples,
    *,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    num_workers: int,
    num_threads: int,
) -> grain.IterDataset:
    """Infinite, shuffled, augmented batches: this process's slice of each global batch.

    Every process walks the same global order (a fresh permutation of all examples each epoch)
    in global batches of `batch_size * process_count`; process p reads and augments only
    examples `[p * batch_size, (p + 1) * batch_size)` of each. So the global batch, and with it
    training, is the same on any number of processes, and each process reads only its part.
    Batches run across epoch boundaries, so none is ever partial.

    Yields {"image": float32 [batch_size, H, W, C], "label": int32 [batch_size],
    "mask": float32 [batch_size], "corrupt": int32 [batch_size]}.
    """
    global_batch = batch_size * process_count
    if len(examples.records) < global_batch:
        raise ValueError(
            f"The global batch ({batch_size} x {process_count} processes = {global_batch}) exceeds the "
            f"{len(examples.records)} training examples; lower the batch size."
        )
    order = grain.MapDataset.range(len(examples.records)).shuffle(seed=_shuffle_seed(seed)).repeat(None)
    ds = order.batch(global_batch, drop_remainder=True)
    ds = ds.map_with_index(_TrainBatch(examples, seed, batch_size, process_index))
    return to_iter_dataset(ds, num_workers=num_workers, num_threads=num_threads)


def eval_pass(
    examples: Examples,
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
    num_workers: int,
    num_threads: int,
) -> grain.IterDataset:
    """One unshuffled, unaugmented pass over this process's examples, padded to whole batches.

    Process p gets examples p, p + P, ... in order. Every process yields
    `ceil(ceil(N / P) / batch_size)` batches, so collectives line up; slots past the end of a
    process's share are zero images with mask 0. Batches as in `train_stream`.
    """
    per_process = -(-len(examples.records) // process_count)
    num_batches = -(-per_process // batch_size)
    ds = grain.MapDataset.range(num_batches * batch_size)
    ds = ds.map(_EvalExample(examples, process_index, process_count))
    ds = ds.batch(batch_size, drop_remainder=True)
    return to_iter_dataset(ds, num_workers=num_workers, num_threads=num_threads)


def to_iter_dataset(ds: grain.MapDataset, *, num_workers: int, num_threads: int) -> grain.IterDataset:
    # Each thread builds whole batches, so `num_threads` (per process) is also how many batches
    # are in flight: it bounds host memory as well as setting the parallelism.
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads))
    if num_workers == 0:
        return iter_ds
    # grain reads an absl flag when it starts workers; programs not run through absl.app (tests,
    # notebooks) have unparsed flags, which grain reports as an error. Defaults are right there.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
