"""The runner every task trains and evaluates with: `train_and_evaluate(task, config, workdir)` and
`evaluate(task, config, workdir)`.

    loop.train_and_evaluate(classification.Classification(), config, workdir)
    loop.evaluate(detection.Detection(), config, workdir, step=None)

A task (`cvolution_jax.tasks`) supplies what differs: its config check, model, data, loss (the
train step) and evaluator, built into a `Run`. The runner owns the rest: the mesh, the checkpoints
(state and data iterator), the loop (`fit`), eval scheduling, metrics and divergence.

Data parallel over a `jax.sharding.Mesh` of every device (all processes): each process reads its
shard of the data, `jax.make_array_from_process_local_data` assembles the global batch sharded
over the mesh's `data` axis, and the state is replicated.

A run is resumable: rerunning the same command with the same workdir restores the latest
checkpoint (state and data iterator) and continues; on CPU the final parameters equal, bitwise,
those of an uninterrupted run. SIGTERM and Ctrl-C save a checkpoint and return; a non-finite loss
stops the run before anything is saved, so the last checkpoint on disk is a good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from cvolution_jax import files, tasks
from cvolution_jax.train import checkpoint, steps, workdir_lock
from cvolution_jax.train.metrics import MetricWriter, plot_curves

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict):
    """The compute dtype `config.dtype` names (parameters stay float32); ValueError naming the choices."""
    name = config.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}; got {name!r}.")
    return DTYPES[name]


def report(message: str) -> None:
    """Prints a line of the run's story once (process 0), without breaking the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


def schedule_length(config: ml_collections.ConfigDict, num_train_examples: int,
                    steps_per_epoch: int | None = None) -> tuple[int, int]:
    """(steps per epoch, total training steps) of a run of `config` on `num_train_examples` images,
    for every task: `steps_per_epoch` global batches per epoch (the train stream's own count, e.g.
    `data.pipeline.batches_per_epoch`; default the whole batches of the examples); `config.num_train_steps`
    if > 0, else `config.num_epochs` epochs. ValueError when a batch exceeds the data or the run has
    no step."""
    if steps_per_epoch is None:
        steps_per_epoch = num_train_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.batch_size={config.batch_size} exceeds the {num_train_examples} training examples; lower it.")
    total_steps = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * steps_per_epoch)
    if total_steps < 1:
        raise ValueError(
            f"The run has {total_steps} training steps: config.num_epochs={config.num_epochs} of this dataset's "
            f"{steps_per_epoch} steps per epoch rounds down to 0. Raise config.num_epochs or set config.num_train_steps.")
    return steps_per_epoch, total_steps


def check_eval_coverage(evaluated: int, skipped: int, expected: int, *, split: str, advice: str,
                        exactly_once: bool = True) -> None:
    """Every image of the eval split was evaluated or skipped (it failed to decode), exactly once,
    and at least one evaluated; reports how many were skipped. The same check for every task.

    Args:
      evaluated, skipped, expected: image counts (over all processes).
      split: the split's name in the messages, e.g. "the eval split" or an annotation file.
      advice: what to check when no image could be decoded.
      exactly_once: False when a task found by image id that some were lost or repeated.

    Raises:
      RuntimeError: images were lost or repeated (a bug in the input pipeline), or none decoded.
    """
    if not exactly_once or evaluated + skipped != expected:
        raise RuntimeError(
            f"The eval pass evaluated {evaluated} and skipped {skipped} images, but {split} has {expected}: images "
            f"were lost or repeated (a bug in the input pipeline).")
    if evaluated == 0:
        raise RuntimeError(f"None of the {expected} images of {split} could be decoded (the warnings name them); {advice}")
    if skipped:
        report(f"Evaluated {evaluated} of {expected} images of {split}: {skipped} could not be decoded and are left out "
               f"of the metrics (the warnings name the files).")


class DivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


def print_config(config: ml_collections.ConfigDict) -> None:
    """Prints the resolved config once (process 0), before anything else of the run."""
    if jax.process_index() == 0:
        print(config)


def _flatten(tree, prefix: tuple = ()) -> dict:
    """`{"data.image_size": 16, ...}` of nested dicts."""
    if not isinstance(tree, dict):
        return {".".join(prefix): tree}
    return {path: leaf for key, value in tree.items() for path, leaf in _flatten(value, (*prefix, str(key))).items()}


def config_differences(saved: dict, current: dict) -> list[str]:
    """`"base_lr: 0.1 -> 0.2"` per field that differs (absent fields shown as `-`)."""
    saved, current = _flatten(saved), _flatten(current)
    return [f"{path}: {saved.get(path, '-')} -> {current.get(path, '-')}"
            for path in sorted(set(saved) | set(current)) if saved.get(path, "-") != current.get(path, "-")]


def save_config(config: ml_collections.ConfigDict, workdir: str, *, step: int = 0, mode: str = "train") -> str | None:
    """Writes the resolved config beside the checkpoints, never over the record of how they were trained.

    - training from scratch (`step` 0): `<workdir>/config.json`;
    - training resumed from checkpoint `step`: `config.json` stays (written if missing); a config that
      differs from it goes to `config_resume_<step>.json`, with a warning naming the fields;
    - evaluation of checkpoint `step` (`mode="eval"`): `config_eval_<step>.json`.

    Returns the path written (process 0), or None when there was nothing new to record.
    """
    if jax.process_index() != 0:
        return None
    os.makedirs(workdir, exist_ok=True)
    text = config.to_json_best_effort(indent=2)
    original = os.path.join(workdir, "config.json")
    if mode == "eval":
        path = os.path.join(workdir, f"config_eval_{step}.json")
    elif step == 0 or not os.path.exists(original):
        path = original
    else:
        try:
            with open(original) as f:
                saved = json.load(f)
            # A run saved before configs named their task has no config.task: it is the task it was, not a change.
            saved.setdefault("task", tasks.name_of(ml_collections.ConfigDict(saved)))
            differences = config_differences(saved, json.loads(text))
        except (OSError, ValueError) as error:
            differences = [f"{original} cannot be read ({error})"]
        if not differences:
            return None
        path = os.path.join(workdir, f"config_resume_{step}.json")
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        log.warning("Resuming from step %d with a config that differs from %s, which the run was started with (%s). "
                    "%s keeps the first; this one is written to %s.", step, original, shown, original, path)
    with open(path, "w") as f:
        f.write(text)
    return path


def initial_state(model, tx, variables: dict, mesh: "DataMesh"):
    """`steps.train_state` of `variables`, replicated over the mesh: every task's initial state
    (a checkpoint is restored into it). `variables` come from the task's own `model.init` (and a
    pretrained backbone)."""
    return jax.jit(lambda v: steps.train_state(model, tx, v), out_shardings=mesh.replicated)(variables)


class DataMesh:
    """The device mesh (every device, one `data` axis) and how host batches become global arrays."""

    def __init__(self, global_batch: int):
        if global_batch % jax.device_count():
            raise ValueError(
                f"config.batch_size={global_batch} is not divisible by the {jax.device_count()} devices; "
                f"use a multiple of {jax.device_count()}."
            )
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.batch = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.per_process = global_batch // jax.process_count()

    def shard(self, batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(v)) for k, v in batch.items() if k != "corrupt"}


@dataclasses.dataclass
class Run:
    """What a task builds for one run: the initial state, its evaluator and, to train, its step.

    Attributes:
      state: the initial train state, replicated over the mesh (a checkpoint is restored into it).
      evaluate: `(state, step) -> metrics` over the whole eval split; reports them itself (process
        0), and gives every process the same numbers (checkpoints are ranked by them).
      total_steps: the run's training steps; steps_per_epoch: steps per pass over the train split
        (the default eval interval). Training only, as are the rest:
      train_iter: the training data iterator (its position is checkpointed).
      step_fn: `(state, host batch, step) -> (state, metrics)`, see `fit`.
      learning_rate: the schedule, logged with the training metrics.
    """

    state: Any
    evaluate: Callable[[Any, int], dict]
    total_steps: int = 0
    steps_per_epoch: int = 1
    train_iter: Iterator | None = None
    step_fn: Callable | None = None
    learning_rate: Callable[[int], Any] | None = None


class Task(Protocol):
    """A task the runner trains and evaluates (`cvolution_jax.tasks`).

    Attributes:
      best_metric: the eval metric that ranks checkpoints (higher is better): "top1", "AP".
      curves: keyword arguments of `metrics.plot_curves` for the run's curves.png.
    """

    best_metric: str
    curves: dict

    def check_config(self, config: ml_collections.ConfigDict, workdir: str, *, train: bool) -> None:
        """Raises ConfigError naming the field, before anything is built."""

    def build(self, config: ml_collections.ConfigDict, workdir: str, mesh: DataMesh, *, train: bool) -> Run:
        """Data, model and initial state; `train=False` builds the eval split only."""


def _check_finite(history: list[dict], ckpt: checkpoint.Checkpointer) -> dict:
    """Host-side means of the per-step metrics since the last check; stops on a non-finite loss."""
    history = jax.device_get(history)
    for record in history:
        for key, what in (("loss", "Training loss"), ("param_norm", "The parameters' norm")):
            if math.isfinite(float(record[key])):
                continue
            latest = ckpt.latest_step()
            kept = (f"the last good checkpoint (step {latest}) is intact" if latest is not None
                    else "there is no checkpoint yet, so a rerun starts from the beginning")
            raise DivergedError(
                f"{what} is {float(record[key])}: the run diverged. Stopped without saving; {kept}. Lower "
                f"--config.base_lr (or check the input data) and rerun the same command"
                f"{' to resume from it' if latest is not None else ''}."
            )
    return {k: float(np.mean([r[k] for r in history])) for k in history[0] if k != "examples"}


@contextlib.contextmanager
def stop_requests():
    """`with stop_requests() as stop:` SIGTERM or SIGINT (Ctrl-C) set `stop["signal"]` instead of
    ending the process, so the loop inside can save and return; a second Ctrl-C raises
    KeyboardInterrupt at once. On leaving, the previous handlers come back and, when a signal
    arrived, a Python handler among them (a caller's own: a grid of runs, `experiments.ablation`)
    is called with it too. Python's default Ctrl-C handler is not: it would raise KeyboardInterrupt
    after the save."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        if signum == signal.SIGINT and stop["signal"] is not None:
            raise KeyboardInterrupt  # pressed again: the user wants out now, not after the save
        stop["signal"] = signum

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    outer = previous.get(stop["signal"])
    if callable(outer) and outer is not signal.default_int_handler:
        outer(stop["signal"], None)


def fit(config, *, state, train_iter, step_fn, total_steps: int, eval_every: int, ckpt: checkpoint.Checkpointer,
        writer: MetricWriter, evaluate, learning_rate) -> dict:
    """The training loop of every task: steps, logging, evaluation, checkpoints, SIGTERM and Ctrl-C.

    SIGTERM or SIGINT (Ctrl-C) finishes the current step, saves a checkpoint and returns; a second
    Ctrl-C raises KeyboardInterrupt at once, without saving. A Python handler of the signal installed
    before `fit` is called with it after the save.

    Args:
      state: the (restored) train state; training continues from `state.step`.
      train_iter: the training data iterator (its position is checkpointed).
      step_fn: `(state, host batch, step) -> (state, metrics)`; metrics hold `loss` and
        `param_norm` (checked finite before anything is saved) and any other scalars.
      eval_every: evaluate every this many steps and at the last one.
      evaluate: `(state, step) -> metrics` over the eval split (reports them itself); empty on
        processes other than 0 is fine.
      learning_rate: the schedule, logged with the training metrics.

    Returns:
      The last evaluation's metrics.
    """
    start = int(state.step)
    history, eval_metrics = [], {}
    with stop_requests() as stop:
        progress = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
        tick, tick_step = time.perf_counter(), start
        try:
            for step in range(start + 1, total_steps + 1):
                state, metrics = step_fn(state, next(train_iter), step)
                history.append(metrics)
                progress.update(1)
                # Read once: a signal arriving later in this iteration is handled at the next step.
                stopping = stop["signal"] is not None
                last = step == total_steps
                evaluate_now = step % eval_every == 0 or last
                save_now = evaluate_now or step % config.checkpoint_every_steps == 0 or stopping
                if step % config.log_every_steps == 0 or save_now:
                    # Every checkpoint is preceded by this check, so none holds a diverged state.
                    summary = _check_finite(history, ckpt)
                    history = []
                    now = time.perf_counter()
                    summary["images_per_sec"] = (step - tick_step) * config.batch_size / (now - tick)
                    summary["learning_rate"] = float(learning_rate(step - 1))
                    tick, tick_step = now, step
                    writer.write(step, "train", summary)
                    progress.set_postfix(loss=f"{summary['loss']:.3f}", img_s=f"{summary['images_per_sec']:.1f}")
                if evaluate_now:
                    try:
                        eval_metrics = evaluate(state, step)
                    except Exception:
                        # An evaluation error (bad val data) must not cost the steps since the last save.
                        ckpt.save(step, state, train_iter, None)
                        report(f"The evaluation at step {step} failed; saved the checkpoint of step {step} first, so "
                               f"rerunning the same command after the fix resumes from it.")
                        raise
                    if eval_metrics:
                        writer.write(step, "eval", eval_metrics)
                if save_now:
                    ckpt.save(step, state, train_iter, eval_metrics if evaluate_now else None)
                if stopping:
                    name = signal.Signals(stop["signal"]).name
                    report(f"Received signal {stop['signal']} ({name}): saved the checkpoint of step {step}; rerun the same "
                           f"command to resume.")
                    break
        finally:
            progress.close()
            ckpt.close()
            writer.close()
    return eval_metrics


def train_and_evaluate(task: Task, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `task` with `config` in `workdir`, resuming from its latest checkpoint. Returns the final eval metrics.

    Raises:
      workdir_lock.WorkdirInUse: another live run is training in `workdir`.
    """
    print_config(config)
    task.check_config(config, workdir, train=True)
    with workdir_lock.hold(workdir):
        return _train_and_evaluate(task, config, workdir)


def _train_and_evaluate(task: Task, config: ml_collections.ConfigDict, workdir: str) -> dict:
    run = task.build(config, workdir, DataMesh(config.batch_size), train=True)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                   best_metric=task.best_metric)
    state = run.state
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, data_iterator=run.train_iter, set_aside_damaged=True)
        log.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
    else:
        set_aside_previous_run(workdir)
    save_config(config, workdir, step=int(state.step))
    eval_metrics = fit(
        config, state=state, train_iter=run.train_iter, step_fn=run.step_fn, total_steps=run.total_steps,
        eval_every=config.eval_every_steps if config.eval_every_steps > 0 else run.steps_per_epoch, ckpt=ckpt,
        writer=MetricWriter(workdir, start_step=int(state.step)), evaluate=run.evaluate,
        learning_rate=run.learning_rate,
    )
    plot_curves(workdir, **task.curves)
    return eval_metrics


# What a run writes besides its checkpoints (and its data, which a dataset writes into the workdir).
RUN_RECORDS = ("config.json", "config_resume_*.json", "config_eval_*.json", "metrics.jsonl", "tensorboard", "curves.png",
               "eval_*")


def set_aside_previous_run(workdir: str) -> str | None:
    """Moves the records of an earlier run (`RUN_RECORDS`) to `<workdir>/previous_<time>/` before
    a run starts from scratch there: one whose checkpoints were deleted, or that stopped before
    its first. Training from step 0 would otherwise replace its config.json and drop its metrics.
    Returns where they went (process 0), or None if there were none."""
    found = sorted({path for pattern in RUN_RECORDS for path in glob.glob(os.path.join(workdir, pattern))})
    if jax.process_index() != 0 or not found:
        return None
    destination = os.path.join(workdir, time.strftime("previous_%Y%m%d-%H%M%S"))
    while os.path.exists(destination):
        destination += "_"
    os.makedirs(destination)
    for path in found:
        os.replace(path, os.path.join(destination, os.path.basename(path)))
    log.warning("%s has no checkpoint, so this run starts from step 0; the records of the run before it (%s) were "
                "moved to %s.", workdir, ", ".join(os.path.basename(p) for p in found), destination)
    return destination


def evaluate(task: Task, config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """Restores checkpoint `step` of `workdir` (default: the latest good one) and evaluates it.

    The task's evaluator reports the metrics; they are written to `<workdir>/eval_<step>.json`,
    the config to `<workdir>/config_eval_<step>.json`. No training data is read.
    """
    print_config(config)
    task.check_config(config, workdir, train=False)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory) or not os.listdir(directory):
        # Said before the task builds: it may write a dataset into the workdir first.
        raise FileNotFoundError(f"No checkpoint in {directory} (steps there: none). Train first, or point --workdir at "
                                f"the run to restore.")
    run = task.build(config, workdir, DataMesh(config.batch_size), train=False)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                   best_metric=task.best_metric)
    try:
        state = ckpt.restore(run.state, step)
    finally:
        ckpt.close()
    save_config(config, workdir, step=int(state.step), mode="eval")
    restored = int(state.step)
    metrics = run.evaluate(state, restored)
    if jax.process_index() == 0:
        with files.atomic_open(os.path.join(workdir, f"eval_{restored}.json")) as f:
            json.dump(files.strict_json({"step": restored, **metrics}), f, indent=1, allow_nan=False)
    return metrics
