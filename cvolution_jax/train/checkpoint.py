"""Orbax checkpoints of a training run: one module for every entry point.

A checkpoint at step N holds the train state (`state`: params, BatchNorm statistics, optimizer
state, step) and the state of the training data iterator (`data`: grain's handler, one JSON file
per process, `process_<i>-of-<n>.json`), so a resumed run sees exactly the examples the
interrupted one had not seen. Across processes, each writes only the array shards it holds and
orbax writes the metadata once. Writes are atomic (orbax writes to a
temporary directory and renames it), so a run killed mid-save leaves the previous checkpoint.
Kept: the last `keep` checkpoints plus the best one by eval top-1.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the model being restored."""


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


def check_compatible(saved, target, where: str) -> None:
    """Raises `CheckpointMismatchError` naming the first parameter whose presence or shape differs."""
    saved_shapes, target_shapes = dict(_paths_and_shapes(saved)), dict(_paths_and_shapes(target))
    for path, shape in target_shapes.items():
        if path not in saved_shapes:
            raise CheckpointMismatchError(
                f"Checkpoint {where} has no array {path} (shape {shape} in the model being restored): it was written "
                f"by a different model. Restore it with the config it was trained with, or use another workdir."
            )
        if saved_shapes[path] != shape:
            raise CheckpointMismatchError(
                f"Checkpoint {where}: {path} has shape {saved_shapes[path]} in the checkpoint but {shape} in the model "
                f"being restored. Restore it with the config it was trained with, or use another workdir."
            )
    extra = sorted(set(saved_shapes) - set(target_shapes))
    if extra:
        raise CheckpointMismatchError(
            f"Checkpoint {where} has array {extra[0]} (shape {saved_shapes[extra[0]]}) that the model being restored lacks: "
            f"it was written by a different model."
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
        policy = preservation_policy.AnyPreservationPolicy([
            preservation_policy.LatestN(n=keep),
            preservation_policy.BestN(get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=False),
        ])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True, cleanup_tmp_directories=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
        )

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
        self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)

    def restore(self, target, step: int | None = None, data_iterator=None):
        """Restores checkpoint `step` (default: the latest) into the structure and shardings of `target`.

        With `data_iterator`, also moves that grain iterator to the saved position. A checkpoint
        written by a different number of processes restores the state; the data iterators then
        start from the beginning of their new shards (logged).

        Returns:
          The restored state.

        Raises:
          FileNotFoundError: no such checkpoint.
          CheckpointMismatchError: the checkpoint's arrays differ from `target`'s (names the first one).
        """
        step = self._existing(step, "Train first, or point --workdir at the run to restore.")
        where = os.path.join(self.directory, str(step))
        check_compatible(self.manager.item_metadata(step)["state"], target, where)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)) if hasattr(x, "shape") else x, target
        )
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            own_file = os.path.join(where, "data", f"process_{jax.process_index()}-of-{jax.process_count()}.json")
            if os.path.exists(own_file):
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                log.warning(
                    "Checkpoint %s holds no data position for process %d of %d (it was written by a different number "
                    "of processes, or without one): the training data restarts from the beginning of this shard.",
                    where, jax.process_index(), jax.process_count(),
                )
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_variables(self, step: int | None = None) -> dict:
        """The model variables (`params`, `batch_stats`) of checkpoint `step` (default: the latest),
        as nested dicts of arrays, without a target: for initialising another model from them
        (a detector's backbone from an ImageNet run). The optimizer state is read and dropped."""
        step = self._existing(step, "Point the path at a finished experiments.imagenet run.")
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
