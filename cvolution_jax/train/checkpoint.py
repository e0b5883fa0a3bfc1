"""Orbax checkpoints of a training run: one module for every entry point.

A checkpoint at step N holds the train state (`state`: params, BatchNorm statistics, optimizer
state, step) and the state of the training data iterator (`data`: grain's handler, one JSON file
per process, `process_<i>-of-<n>.json`), so a resumed run sees exactly the examples the
interrupted one had not seen. Across processes, each writes only the array shards it holds and
orbax writes the metadata once. Writes are atomic (orbax writes to a
temporary directory and renames it), so a run killed mid-save leaves the previous checkpoint.
Kept: the last `keep` checkpoints plus the best one by eval top-1 (its metrics are written into
the checkpoint, `<step>/metrics/metrics`, so a resumed run still knows which one is best).

A checkpoint whose files are damaged (a truncated array file, a lost `state/_METADATA`, an
unreadable data-iterator JSON) is skipped with a warning naming what is wrong, and the next older
one is restored; training moves the skipped ones to `<directory>_damaged/` so that it can write
those steps again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

log = logging.getLogger(__name__)


class _SavesBetweenEvaluations(logging.Filter):
    """Drops orbax's warning for a save without metrics: with `best_fn` set (so that metrics are
    written to disk) orbax expects them at every save, but only the checkpoints of an evaluation
    have any, by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


class _AfterAFailedSave(logging.Filter):
    """One line per error of orbax's, none of asyncio's, when a save fails (a full disk) or is cut
    short (Ctrl-C twice). Each of orbax's background threads then logs the same error with a
    traceback, and asyncio logs every write task that failed ("Task exception was never
    retrieved"), 70 or more per save. The error itself reaches the caller (`CheckpointWriteError`,
    the entry point's Ctrl-C message), which says what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        if record.name == "asyncio":
            return not is_out_of_space(record.exc_info[1])
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("absl").addFilter(_SavesBetweenEvaluations())
for _logger in ("absl", "asyncio"):
    logging.getLogger(_logger).addFilter(_AfterAFailedSave())


def _drop_writes_after_a_failed_save(unraisable, previous=sys.unraisablehook) -> None:
    """When a save fails (a full disk), orbax closes its asyncio loop while TensorStore still has
    writes in flight; each one that completes then reports "Event loop is closed" as an unraisable
    error with a traceback, 70 to 150 of them per failed save. The save's error says it once."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    previous(unraisable)


sys.unraisablehook = _drop_writes_after_a_failed_save


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the model being restored."""


class DamagedCheckpointError(ValueError):
    """A checkpoint's files are missing or unreadable, and no older one could stand in for it."""


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (the disk is full); the ones before it are intact."""


# How the operating system's "disk full" reaches us: an OSError's errno, or inside the text of the
# error TensorStore raises through orbax ("No space left on device [os_error_code='28']").
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded")


def is_out_of_space(error: BaseException) -> bool:
    """Whether `error`, or an error in its chain, is the operating system's "no space left" / "quota exceeded"."""
    while error is not None:
        if getattr(error, "errno", None) in _NO_SPACE_ERRNOS or any(text in str(error) for text in _NO_SPACE_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


class _Damage(Exception):
    """Why one checkpoint cannot be read (internal: restore tries the next older one)."""


def brief_error(error: BaseException, limit: int = 240) -> str:
    """The first line of the error at the root of `error`'s chain (orbax wraps TensorStore's, which
    names the file), without TensorStore's spec dump, at most `limit` characters."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = str(error).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else ""
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process, so that every process skips the same checkpoints."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


# Orbax raises whatever a missing or garbled file makes TensorStore, grain or json raise, some of
# it wrapped in a bare Exception: any error while reading one step's files counts as damage to it,
# and an error that is not (a bug, memory) fails every step in turn and is reported, moving nothing.
_READ_ERRORS = (Exception,)


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _paths_and_shapes(tree) -> list[tuple[str, tuple]]:
    """`("params/layer1_0/conv1/kernel", shape)` per leaf: the same names for a train state and
    for the nested dicts of a checkpoint's metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(_key_name(k) for k in path), tuple(getattr(leaf, "shape", ()))) for path, leaf in leaves]


def check_compatible(saved, target, where: str, config_file: str | None = None) -> None:
    """Raises `CheckpointMismatchError` naming the first parameter whose presence or shape differs.

    `config_file`: the config the checkpoint was trained with, named in the advice when given.
    """
    saved_shapes, target_shapes = dict(_paths_and_shapes(saved)), dict(_paths_and_shapes(target))
    trained_with = f" ({config_file})" if config_file else ""
    advice = f"Restore it with the config it was trained with{trained_with}, or use another workdir."
    for path, shape in target_shapes.items():
        if path not in saved_shapes:
            raise CheckpointMismatchError(
                f"Checkpoint {where} has no array {path} (shape {shape} in the model being restored): it was written "
                f"by a different model. {advice}"
            )
        if saved_shapes[path] != shape:
            raise CheckpointMismatchError(
                f"Checkpoint {where}: {path} has shape {saved_shapes[path]} in the checkpoint but {shape} in the model "
                f"being restored. {advice}"
            )
    extra = sorted(set(saved_shapes) - set(target_shapes))
    if extra:
        raise CheckpointMismatchError(
            f"Checkpoint {where} has array {extra[0]} (shape {saved_shapes[extra[0]]}) that the model being restored lacks: "
            f"it was written by a different model. {advice}"
        )


class Checkpointer:
    """Saves and restores `(train state, data iterator state)` under `directory`.

    Args:
      directory: where step directories `<step>/` are written.
      keep: how many of the most recent checkpoints to keep (the best by `best_metric` is kept too).
      best_metric: key of the metrics passed to `save` that ranks checkpoints (higher is better).
    """

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str = "top1"):
        self.directory = os.path.abspath(directory)
        self.restored_step: int | None = None  # the step the last restore read (a damaged latest one is skipped)
        rank = lambda metrics: metrics[best_metric]  # noqa: E731
        policy = preservation_policy.AnyPreservationPolicy([
            preservation_policy.LatestN(n=keep),
            preservation_policy.BestN(get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False),
        ])
        # `best_fn` is what makes orbax write a checkpoint's metrics to disk; without it a resumed
        # run reads no metrics back, BestN sees no best, and the best checkpoint is deleted.
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=rank, best_mode="max", create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
        )

    @property
    def config_file(self) -> str:
        """The config the run was trained with: `config.json` beside the checkpoints folder."""
        return os.path.join(os.path.dirname(self.directory), "config.json")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def _existing(self, step: int | None, advice: str) -> int:
        """`step` (the latest for None) if its checkpoint exists; else FileNotFoundError with `advice`."""
        steps = self.all_steps()
        step = self.latest_step() if step is None else step
        if step is None or step not in steps:
            raise FileNotFoundError(
                f"No checkpoint {'' if step is None else f'at step {step} '}in {self.directory} (steps there: {steps or 'none'}). {advice}"
            )
        return step

    def save(self, step: int, state, data_iterator=None, metrics: dict | None = None) -> None:
        """Writes checkpoint `step` (asynchronously; `wait()` or `close()` to block until written).

        `data_iterator`: the grain iterator of the training data, whose position is saved.
        """
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        metrics = None if metrics is None else {k: float(np.asarray(v)) for k, v in metrics.items()}
        self.wait()  # orbax's save waits for the previous one too; here its error names that step
        self._saving = step
        with self._writing():
            self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)

    @contextlib.contextmanager
    def _writing(self):
        """Turns a full disk while writing checkpoint `self._saving` into one `CheckpointWriteError`
        (orbax's own error names a temporary file deep inside the step's directory)."""
        try:
            yield
        except Exception as error:
            if not is_out_of_space(error):
                raise
            failed = getattr(self, "_saving", None)
            intact = [step for step in self.all_steps() if step != failed]
            resume = (f"the latest is step {max(intact)}; free space there and rerun the same command to resume from it"
                      if intact else "there are none yet; free space there and rerun the same command")
            raise CheckpointWriteError(
                f"No space left on the disk of {self.directory}: checkpoint {failed} could not be written. It is left "
                f"incomplete, and the next start ignores it; the checkpoints before it are intact ({resume})."
            ) from None

    def restore(self, target, step: int | None = None, data_iterator=None, *, set_aside_damaged: bool = False):
        """Restores checkpoint `step` (default: the latest good one) into the structure and shardings of `target`.

        With `data_iterator`, also moves that grain iterator to the saved position. A checkpoint
        written by a different number of processes restores the state; the data iterators then
        start from the beginning of their new shards (logged).

        With the default `step`, a damaged checkpoint is skipped with a warning naming what is
        wrong, and the next older one restored. `set_aside_damaged` (a resumed training run, which
        will write those steps again) moves the skipped ones to `<directory>_damaged/`.

        Returns:
          The restored state.

        Raises:
          FileNotFoundError: no such checkpoint.
          CheckpointMismatchError: the checkpoint's arrays differ from `target`'s (names the first one).
          DamagedCheckpointError: checkpoint `step` is damaged, or with the default `step` every one is.
        """
        advice = "Train first, or point --workdir at the run to restore."
        return self._restore_first_good(step, advice, target, data_iterator, set_aside_damaged)

    def restore_variables(self, step: int | None = None) -> dict:
        """The model variables (`params`, `batch_stats`) of checkpoint `step` (default: the latest
        good one), as nested dicts of arrays, without a target: for initialising another model
        from them (a detector's backbone from an ImageNet run). The optimizer state is read and dropped."""
        state = self._restore_first_good(step, "Point the path at a finished experiments.imagenet run.", None, None, False)
        return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}

    def _restore_first_good(self, step, advice: str, target, data_iterator, set_aside_damaged: bool):
        """Restores `step`, or for None the newest checkpoint that is not damaged (see `restore`)."""
        if step is not None:
            step = self._existing(step, advice)
            try:
                state = self._restore_step(step, target, data_iterator)
                self.restored_step = step
                return state
            except _Damage as damage:
                raise DamagedCheckpointError(
                    f"Checkpoint {self._where(step)} is damaged: {damage}. Remove that directory, or restore another "
                    f"step with --config.checkpoint_step=N (steps there: {self.all_steps()})."
                ) from None
        self._existing(None, advice)
        damaged = []
        for candidate in sorted(self.all_steps(), reverse=True):
            try:
                state = self._restore_step(candidate, target, data_iterator)
            except _Damage as damage:
                damaged.append((candidate, str(damage)))
                continue
            for bad, what in damaged:
                moved = self._set_aside(bad) if set_aside_damaged else None
                log.warning(
                    "Checkpoint %s is damaged: %s. %s; restored step %d instead.", self._where(bad), what,
                    f"Moved it to {moved}" if moved else "Skipped it", candidate,
                )
            if damaged and set_aside_damaged:
                multihost_utils.sync_global_devices("damaged checkpoints set aside")
                self.manager.reload()
            self.restored_step = candidate
            return state
        listing = "; ".join(f"step {bad}: {what}" for bad, what in damaged)
        raise DamagedCheckpointError(
            f"No checkpoint in {self.directory} can be restored ({listing}). Remove the damaged step directories to "
            f"start afresh, or point --workdir at another run."
        )

    def _where(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _restore_step(self, step: int, target, data_iterator):
        """Restores checkpoint `step`; raises `_Damage` saying what is wrong if its files are
        missing or unreadable (the same on every process, so all skip the same checkpoints)."""
        where = self._where(step)
        damage = None
        try:
            saved = self.manager.item_metadata(step).get("state")
        except _READ_ERRORS as error:
            saved, damage = None, f"its metadata cannot be read ({brief_error(error)})"
        if saved is None and damage is None:
            missing = [path for path in (os.path.join(where, "state"), os.path.join(where, "state", "_METADATA"))
                       if not os.path.exists(path)]
            damage = f"{missing[0]} is missing" if missing else "it holds no train state"
        own_file = os.path.join(where, "data", f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        restore_data = data_iterator is not None and os.path.exists(own_file)
        if restore_data and damage is None:
            try:
                with open(own_file) as f:
                    json.load(f)
            except (ValueError, OSError) as error:
                damage = f"its data-iterator position {own_file} cannot be read ({brief_error(error)})"
        if _any_process(damage is not None):
            raise _Damage(damage or "another process found it damaged")
        if target is None:
            abstract = None
        else:
            check_compatible(saved, target, where, self.config_file if os.path.exists(self.config_file) else None)
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)) if hasattr(x, "shape") else x,
                target,
            )
        state, damage = None, None
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except _READ_ERRORS as error:
            damage = f"its train state cannot be read ({brief_error(error)})"
        if damage is None and restore_data:
            try:
                self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
            except _READ_ERRORS as error:
                damage = f"its data-iterator position {own_file} cannot be restored ({brief_error(error)})"
        if _any_process(damage is not None):
            raise _Damage(damage or "another process could not read it")
        if data_iterator is not None and not restore_data:
            log.warning(
                "Checkpoint %s holds no data position for process %d of %d (it was written by a different number "
                "of processes, or without one): the training data restarts from the beginning of this shard.",
                where, jax.process_index(), jax.process_count(),
            )
        return state

    def _set_aside(self, step: int) -> str:
        """Moves checkpoint `step` to `<directory>_damaged/<step>` (process 0); returns where."""
        destination = os.path.join(self.directory + "_damaged", str(step))
        suffix = 1
        while os.path.exists(destination):
            destination = os.path.join(self.directory + "_damaged", f"{step}-{suffix}")
            suffix += 1
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.move(self._where(step), destination)
        return destination

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        # Newer orbax cleans up temporary paths in a thread started with the manager, and its close()
        # does not wait for it: a run that ends at once ("No checkpoint") left that thread to fail at
        # interpreter exit with a traceback. Wait for it where this orbax has it.
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if callable(await_cleanup):
            await_cleanup()
        self.wait()
        self.manager.close()
