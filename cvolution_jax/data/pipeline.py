"""The one input pipeline of every task: sharding, sampling, per-example RNG, padding, batching.

A task describes a split as `Examples` (random-access records, a `preprocess` function, the empty
slot of a batch, a sampler); `train_stream` and `eval_pass` turn that into a `grain.IterDataset`
of batches, the same way for classification, detection and segmentation:

    examples = Examples(records, preprocess, padding, num_classes)   # sampler: DefaultSampler()
    stream = train_stream(examples, batch_size=8, seed=0, num_workers=0, num_threads=4)
    it = iter(stream); batch = next(it)   # each key of `preprocess`'s examples stacked, [8, ...],
                                          # and "valid" float32 [8]
    state = it.get_state()                # JSON-serialisable; `it.set_state(state)` resumes exactly here

Every batch holds `valid`, float32 [b]: 1 for a real example, 0 for an eval padding slot or an
example whose image failed to decode (its `corrupt` is 1). Losses and metrics weight examples by it.

Which records form each global batch of `batch_size * process_count` is the sampler's:
- `DefaultSampler` (mmengine's): training walks a fresh permutation of all records each epoch,
  its batches running across epoch boundaries, so none is ever partial; evaluation deals the
  records out in order, process p reading records p, p + P, ...
- `GroupSampler` (mmdet's, for size buckets): every batch holds records of one bucket (one static
  shape, so a jitted step compiles once per bucket). Training: each epoch a seeded permutation cut
  into global batches per bucket (each bucket's remainder sits the epoch out), the batches' order
  shuffled. Evaluation: per bucket in record order, each bucket's last global batch padded.

Every process walks the same global batches and reads and preprocesses only its slice,
`[p * batch_size, (p + 1) * batch_size)`: the global batch, and with it training, is the same on
any number of processes. Record i of epoch e is augmented with `np.random.default_rng((seed, e, i))`
and nothing else: fresh augmentation each epoch, whatever the thread, worker or number of processes.

Batching happens on the `MapDataset`, before `to_iter_dataset`/`mp_prefetch`: grain's worker
processes then each build whole batches (worker w gets batches w, w + W, ...), so the stream is
the same batch for batch with any `num_workers`, and only finished batches cross process
boundaries.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

log = logging.getLogger(__name__)

# One example: the arrays of one slot, e.g. {"image": float32 [H, W, C], "label": int32 [],
# "corrupt": int32 []}; every task's has "corrupt" (1: the image failed to decode).
Example = dict[str, np.ndarray]
Preprocess = Callable[[Any, "np.random.Generator | None"], Example]
# bucket index -> the example of an empty slot in a batch of that bucket (corrupt 0).
Padding = Callable[[int], Example]


@dataclasses.dataclass(frozen=True)
class DefaultSampler:
    """mmengine's `DefaultSampler`: one bucket; training shuffles, evaluation deals out in order."""

    def batches_per_epoch(self, num_records: int, global_batch: int) -> int:
        """Global batches per pass over the records (the remainder sits the epoch out)."""
        return num_records // global_batch

    def train_batches(self, num_records: int, batch_size: int, process_count: int, seed: int) -> grain.MapDataset:
        """Element t: `(record ids int64 [G], epoch of each int64 [G])` of global batch t, G the global
        batch: a fresh permutation of all records each epoch, cut into consecutive global batches."""
        global_batch = batch_size * process_count
        if num_records < global_batch:
            raise ValueError(
                f"The global batch ({batch_size} x {process_count} processes = {global_batch}) exceeds the "
                f"{num_records} training examples; lower the batch size."
            )
        order = grain.MapDataset.range(num_records).shuffle(seed=_shuffle_seed(seed)).repeat(None)
        return order.batch(global_batch, drop_remainder=True).map_with_index(_Epochs(num_records))

    def eval_batches(self, num_records: int, batch_size: int, process_count: int) -> tuple[np.ndarray, np.ndarray]:
        """`(record ids int64 [num_batches, P * batch_size], -1 for padding; bucket int32 [num_batches])`:
        process p's slots are records p, p + P, ..., padded to `ceil(ceil(N / P) / batch_size)` batches."""
        per_process = -(-num_records // process_count)
        num_batches = -(-per_process // batch_size)
        position = np.arange(num_batches * batch_size, dtype=np.int64).reshape(num_batches, 1, batch_size)
        ids = (np.arange(process_count).reshape(1, process_count, 1) + position * process_count)
        ids = ids.reshape(num_batches, process_count * batch_size)
        return np.where(ids < num_records, ids, -1), np.zeros(num_batches, np.int32)


@dataclasses.dataclass(frozen=True)
class _Epochs:
    """(global batch number t, its record ids [G]) -> (ids, the epoch each id was drawn in [G])."""

    num_records: int

    def __call__(self, t: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ids, (t * len(ids) + np.arange(len(ids))) // self.num_records


@dataclasses.dataclass(frozen=True, eq=False)
class GroupSampler:
    """mmdet's `GroupSampler` over size buckets: every batch holds records of one bucket.

    Attributes:
      buckets: (H, W) of each bucket (named in errors).
      bucket_of: int32 [N], each record's bucket.
      train_ids: int64 [M], the records training draws from (e.g. those with targets); None: all.
        Evaluation reads every record.
    """

    buckets: tuple[tuple[int, int], ...]
    bucket_of: np.ndarray
    train_ids: np.ndarray | None = None

    def _train_ids(self, num_records: int) -> np.ndarray:
        return np.arange(num_records, dtype=np.int64) if self.train_ids is None else self.train_ids

    def batches_per_epoch(self, num_records: int, global_batch: int) -> int:
        """Global batches per epoch: per bucket, its training records // the global batch (each
        bucket's remainder and the records training leaves out sit the epoch out)."""
        return _group_batches(self.bucket_of, self._train_ids(num_records), len(self.buckets), global_batch)

    def train_batches(self, num_records: int, batch_size: int, process_count: int, seed: int) -> grain.MapDataset:
        """Element t: `(record ids int64 [G], epoch of each int64 [G])` of global batch t (see `_EpochPlans`)."""
        train_ids = self._train_ids(num_records)
        plans = _EpochPlans(self.bucket_of, train_ids, len(self.buckets), seed, batch_size * process_count)
        if plans.batches_per_epoch == 0:
            counts = np.bincount(self.bucket_of[train_ids], minlength=len(self.buckets)).tolist()
            raise ValueError(
                f"No bucket holds a whole global batch ({batch_size} x {process_count} processes = "
                f"{plans.global_batch} images): training images per bucket {counts} (buckets {self.buckets}). "
                f"Lower the batch size or use fewer buckets."
            )
        return grain.MapDataset.range(plans.batches_per_epoch).repeat(None).map_with_index(plans)

    def eval_batches(self, num_records: int, batch_size: int, process_count: int) -> tuple[np.ndarray, np.ndarray]:
        """`(record ids int64 [num_batches, P * batch_size], -1 for padding; bucket int32 [num_batches])`:
        per bucket (bucket order, then record order) global batches, the bucket's last one padded."""
        global_batch = batch_size * process_count
        groups, bucket_of_batch = [], []
        for b in range(len(self.buckets)):
            members = np.flatnonzero(self.bucket_of == b)
            num_batches = -(-len(members) // global_batch)
            padded = np.full(num_batches * global_batch, -1, np.int64)
            padded[:len(members)] = members
            groups.append(padded.reshape(num_batches, global_batch))
            bucket_of_batch += [b] * num_batches
        return np.concatenate(groups), np.asarray(bucket_of_batch, np.int32)


def _group_batches(bucket_of: np.ndarray, train_ids: np.ndarray, num_buckets: int, global_batch: int) -> int:
    return sum(int(np.sum(bucket_of[train_ids] == b)) // global_batch for b in range(num_buckets))


class _EpochPlans:
    """(global batch number t, t mod batches-per-epoch) -> (record ids [G], epochs [G]) of `GroupSampler`.

    Each epoch e: a permutation of `train_ids` seeded by (seed, e); per bucket, in that order,
    global batches of G (each bucket's remainder sits the epoch out); then the batches' order
    shuffled with the same generator. Caches the current epoch's plan; the cache never travels by
    pickle, and a lost race between threads only recomputes the same plan.
    """

    def __init__(self, bucket_of: np.ndarray, train_ids: np.ndarray, num_buckets: int, seed: int, global_batch: int):
        self.bucket_of = bucket_of
        self.train_ids = train_ids
        self.num_buckets = num_buckets
        self.seed = seed
        self.global_batch = global_batch
        self.batches_per_epoch = _group_batches(bucket_of, train_ids, num_buckets, global_batch)
        self._cached = None

    def __getstate__(self):
        return {**self.__dict__, "_cached": None}

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """int64 [batches_per_epoch, global batch]: record ids of each global batch."""
        cached = self._cached
        if cached is not None and cached[0] == epoch:
            return cached[1]
        # A spawn key keeps this stream apart from the per-record (seed, epoch, id) streams:
        # numpy seeds (s, e) and (s, e, 0) identically.
        rng = np.random.default_rng(np.random.SeedSequence((self.seed, epoch), spawn_key=(1,)))
        order = self.train_ids[rng.permutation(len(self.train_ids))]
        buckets = self.bucket_of[order]
        groups = []
        for b in range(self.num_buckets):
            members = order[buckets == b]
            whole = len(members) // self.global_batch * self.global_batch
            groups.append(members[:whole].reshape(-1, self.global_batch))
        plan = np.concatenate(groups)[rng.permutation(self.batches_per_epoch)]
        self._cached = (epoch, plan)
        return plan

    def __call__(self, t: int, batch_in_epoch: int) -> tuple[np.ndarray, np.ndarray]:
        epoch = t // self.batches_per_epoch
        return self.epoch_plan(epoch)[batch_in_epoch], np.full(self.global_batch, epoch, np.int64)


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int | None:
    """Index of the first bucket (H, W) with height <= H and width <= W; None if none fits."""
    for index, (bucket_height, bucket_width) in enumerate(buckets):
        if height <= bucket_height and width <= bucket_width:
            return index
    return None


@dataclasses.dataclass(frozen=True)
class Examples:
    """A dataset split as the pipeline sees it.

    Attributes:
      records: every record of the split over all processes, random access (`len`, `[i]`).
        Travels to grain's worker processes by pickle, so it holds data or file names, not
        open handles.
      preprocess: `preprocess(record, rng) -> Example`; `rng` is a `np.random.Generator` for
        training (augment with it and nothing else) and None for evaluation (no augmentation).
        An image that fails to decode is an example with `corrupt` 1, never an exception.
        Must be picklable: a module-level function or a dataclass instance, not a lambda.
      padding: `padding(bucket) -> Example`, the empty slot (zeros, `corrupt` 0) of a batch of that
        bucket, which evaluation pads with. Picklable like `preprocess`.
      num_classes: labels are in [0, num_classes).
      sampler: which records form each global batch: `DefaultSampler()` or a `GroupSampler`.
    """

    records: Sequence[Any]
    preprocess: Preprocess
    padding: Padding
    num_classes: int
    sampler: DefaultSampler | GroupSampler = DefaultSampler()


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
    """Packs one classification example with the dtypes the batches promise. image: [H, W, C]."""
    return {
        "image": np.asarray(image, np.float32),
        "label": np.int32(label),
        "corrupt": np.int32(corrupt),
    }


@dataclasses.dataclass(frozen=True)
class ImagePadding:
    """The empty slot of a classification split: a zero image `image_shape` (H, W, C), label 0."""

    image_shape: tuple[int, int, int]

    def __call__(self, bucket: int) -> Example:
        return example(np.zeros(self.image_shape, np.float32), 0)


def _valid(ex: Example) -> Example:
    # A corrupt image is already an empty slot; valid 0 keeps it out of the loss and the metrics.
    return {**ex, "valid": np.float32(1 - ex["corrupt"])}


def _stack(rows: list[Example]) -> Example:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


@dataclasses.dataclass(frozen=True)
class _TrainSlice:
    """(record ids [G], epochs [G]) of a global batch -> this process's slice, augmented and stacked."""

    examples: Examples
    seed: int
    batch_size: int
    process_index: int

    def __call__(self, global_batch: tuple[np.ndarray, np.ndarray]) -> Example:
        ids, epochs = global_batch
        first = self.process_index * self.batch_size
        rows = []
        for record_id, epoch in zip(ids[first:first + self.batch_size], epochs[first:first + self.batch_size]):
            record_id = int(record_id)
            rng = np.random.default_rng((self.seed, int(epoch), record_id))
            rows.append(_valid(self.examples.preprocess(self.examples.records[record_id], rng)))
        return _stack(rows)


@dataclasses.dataclass(frozen=True, eq=False)
class _EvalBatch:
    """Batch number -> this process's slots of that global batch, stacked; record id -1 is padding."""

    examples: Examples
    slots: np.ndarray  # int64 [num_batches, batch_size]: this process's record ids
    bucket_of_batch: np.ndarray  # int32 [num_batches]

    def __call__(self, batch: int) -> Example:
        bucket = int(self.bucket_of_batch[batch])
        return _stack([
            _valid(self.examples.preprocess(self.examples.records[int(i)], None)) if i >= 0
            else {**self.examples.padding(bucket), "valid": np.float32(0)}
            for i in self.slots[batch]
        ])


def _shuffle_seed(seed: int) -> int:
    # grain's shuffle seeds epoch e with `seed + e`, so seeds 0 and 1 would share permutations
    # one epoch apart; hashing the seed into 32 bits keeps runs unrelated.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _processes(batch_size: int, num_workers: int, num_threads: int, process_index: int | None,
               process_count: int | None) -> tuple[int, int]:
    """Checks a stream's options; returns `(process_index, process_count)`, jax's by default."""
    if process_index is None or process_count is None:
        # Imported here so grain's worker processes, which import this package to unpickle the
        # pipeline, need not import jax.
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count), got {process_index} of {process_count}.")
    if batch_size < 1:
        raise ValueError(f"batch_size (per process) must be >= 1, got {batch_size}.")
    if num_workers < 0 or num_threads < 1:
        raise ValueError(
            f"data.num_workers must be >= 0 and data.num_threads >= 1, got {num_workers} and {num_threads}."
        )
    return process_index, process_count


def batches_per_epoch(examples: Examples, global_batch: int) -> int:
    """How many global batches of `global_batch` examples `train_stream` gives per epoch: what a
    schedule counts in epochs (a sampler may leave records or remainders out of training)."""
    return examples.sampler.batches_per_epoch(len(examples.records), global_batch)


def train_stream(
    examples: Examples,
    *,
    batch_size: int,
    seed: int,
    num_workers: int,
    num_threads: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Infinite, shuffled, augmented batches: this process's slice of each of the sampler's global
    batches (module docstring), bit-for-bit reproducible from `seed` and resumable.

    Args:
      examples: the split.
      batch_size: examples per batch in THIS process; the global batch is `batch_size * process_count`.
      seed: shuffling and augmentation seed (a non-negative int). It never changes which examples
        form a split.
      num_workers: grain worker processes (0 builds batches in this process).
      num_threads: threads per process, each building one batch at a time.
      process_index, process_count: this process's place among the data-parallel processes;
        default `jax.process_index()` / `jax.process_count()`.

    Yields `preprocess`'s keys, each stacked to `[batch_size, ...]`, and "valid" float32 [batch_size].
    """
    process_index, process_count = _processes(batch_size, num_workers, num_threads, process_index, process_count)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}.")
    batches = examples.sampler.train_batches(len(examples.records), batch_size, process_count, seed)
    log.info("Train stream: %d records, %s; process %d of %d, batch %d per process.", len(examples.records),
             type(examples.sampler).__name__, process_index, process_count, batch_size)
    ds = batches.map(_TrainSlice(examples, seed, batch_size, process_index))
    return _to_iter_dataset(ds, num_workers=num_workers, num_threads=num_threads)


def eval_pass(
    examples: Examples,
    *,
    batch_size: int,
    num_workers: int,
    num_threads: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """One unshuffled, unaugmented pass: every record exactly once over all processes.

    The sampler's global batches (module docstring) are padded with `examples.padding` slots
    (valid 0, corrupt 0); every process yields the same number of batches, so collectives line up
    (a process may get a batch of padding only). Arguments and batches as in `train_stream`;
    evaluate only slots with `valid` 1, and count those with `corrupt` 1: images that failed to
    decode.
    """
    process_index, process_count = _processes(batch_size, num_workers, num_threads, process_index, process_count)
    ids, bucket_of_batch = examples.sampler.eval_batches(len(examples.records), batch_size, process_count)
    first = process_index * batch_size
    ds = grain.MapDataset.range(len(ids)).map(_EvalBatch(examples, ids[:, first:first + batch_size], bucket_of_batch))
    return _to_iter_dataset(ds, num_workers=num_workers, num_threads=num_threads)


def _to_iter_dataset(ds: grain.MapDataset, *, num_workers: int, num_threads: int) -> grain.IterDataset:
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
