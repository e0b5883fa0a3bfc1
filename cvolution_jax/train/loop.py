"""The classification training loop: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

Data parallel over a `jax.sharding.Mesh` of every device (all processes): each process reads its
shard of the data, `jax.make_array_from_process_local_data` assembles the global batch sharded
over the mesh's `data` axis, and the state is replicated. One jitted `train_step`.

A run is resumable: rerunning the same command with the same workdir restores the latest
checkpoint (state and data iterator) and continues; on CPU the final parameters equal, bitwise,
those of an uninterrupted run. SIGTERM and Ctrl-C save a checkpoint and return; a non-finite loss
stops the run before anything is saved, so the last checkpoint on disk is a good one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from cvolution_jax import data, models
from cvolution_jax.train import checkpoint, config_checks, optim, steps
from cvolution_jax.train.metrics import MetricWriter, plot_curves

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def report(message: str) -> None:
    """Prints a line of the run's story once (process 0), without breaking the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


class DivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


def create_model(config: ml_collections.ConfigDict, num_classes: int):
    """The model of `config.model` (`name` from the registry plus `overrides` of its fields)."""
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}; got {config.dtype!r}.")
    overrides = dict(config.model.get("overrides", {}))
    return models.create(config.model.name, num_classes=num_classes, dtype=DTYPES[config.dtype], **overrides)


def print_config(config: ml_collections.ConfigDict) -> None:
    """Prints the resolved config once (process 0), before anything else of the run."""
    if jax.process_index() == 0:
        print(config)


def _flatten(tree, prefix: tuple = ()) -> dict:
    """`{"data.image_size": 16, ...}` of nested dicts."""
    if not isinstance(tree, dict):
        return {".".join(prefix): tree}
    return {path: leaf for key, value in tree.items() for path, leaf in _flatten(value, (*prefix, str(key))).items()}


def _config_differences(saved: dict, current: dict) -> list[str]:
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
                differences = _config_differences(json.load(f), json.loads(text))
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


def _setup(config, workdir):
    """Everything a run needs before its first step: mesh, data, model, optimizer, initial state."""
    mesh = DataMesh(config.batch_size)
    train_split = data.create_split(config.data, train=True, batch_size=mesh.per_process, seed=config.seed)
    eval_split = data.create_split(config.data, train=False, batch_size=mesh.per_process, seed=config.seed)
    steps_per_epoch = train_split.num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.batch_size={config.batch_size} exceeds the {train_split.num_examples} training examples; lower it."
        )
    total_steps = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * steps_per_epoch)
    model = create_model(config, train_split.num_classes)
    tx = optim.create_optimizer(config, steps_per_epoch, total_steps)
    init = jax.jit(functools.partial(steps.create_train_state, model, tx, train_split.image_shape), out_shardings=mesh.replicated)
    state = init(jax.random.key(config.seed))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    return mesh, train_split, eval_split, steps_per_epoch, total_steps, state, ckpt


def run_eval(state, eval_split, mesh: DataMesh, eval_fn) -> dict:
    """Top-1, top-5 and loss over the whole eval split (every example exactly once).

    An image that failed to decode is left out (its mask is 0) and counted, as in training, so one
    damaged validation file never stops a run. Returns `{"loss", "top1", "top5"}` averaged over
    the `images` evaluated, plus `images` and `skipped_images` (the split's size is their sum).
    """
    totals, corrupt = None, 0
    for batch in eval_split.dataset:
        corrupt += int(np.sum(batch["corrupt"]))
        sums = eval_fn(state, mesh.shard(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    if jax.process_count() > 1:  # each process counted the failures of its own shard
        corrupt = int(np.sum(multihost_utils.process_allgather(np.int64(corrupt))))
    evaluated = round(float(totals["examples"]))
    if evaluated + corrupt != eval_split.num_examples:
        raise RuntimeError(
            f"Evaluated {evaluated} examples and skipped {corrupt} that failed to decode, but the eval split has "
            f"{eval_split.num_examples}: the eval pass lost or repeated examples (a bug in the input pipeline)."
        )
    if evaluated == 0:
        raise RuntimeError(
            f"None of the {eval_split.num_examples} eval images could be decoded (the warnings name them); "
            f"check data.data_dir and the validation files."
        )
    if corrupt:
        report(
            f"Evaluated {evaluated} of {eval_split.num_examples} eval images: {corrupt} could not be decoded and "
            f"are left out of the metrics (the warnings name the files)."
        )
    metrics = {key: float(totals[key]) / evaluated for key in ("loss", "top1", "top5")}
    return {**metrics, "images": evaluated, "skipped_images": corrupt}


def _check_finite(history: list[dict], ckpt: checkpoint.Checkpointer) -> dict:
    """Host-side means of the per-step metrics since the last check; stops on a non-finite loss."""
    history = jax.device_get(history)
    for record in history:
        for key, what in (("loss", "Training loss"), ("param_norm", "The parameters' norm")):
            if math.isfinite(float(record[key])):
                continue
            raise DivergedError(
                f"{what} is {float(record[key])}: the run diverged. Stopped without saving; the last good "
                f"checkpoint (step {ckpt.latest_step()}) is intact. Lower --config.base_lr (or check the input data) and "
                f"rerun the same command to resume from it."
            )
    return {k: float(np.mean([r[k] for r in history])) for k in history[0] if k != "examples"}


def fit(config, *, state, train_iter, step_fn, total_steps: int, eval_every: int, ckpt: checkpoint.Checkpointer,
        writer: MetricWriter, evaluate, learning_rate) -> dict:
    """The training loop of every task: steps, logging, evaluation, checkpoints, SIGTERM and Ctrl-C.

    SIGTERM or SIGINT (Ctrl-C) finishes the current step, saves a checkpoint and returns; a second
    Ctrl-C raises KeyboardInterrupt at once, without saving.

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
    if total_steps < 1:
        raise ValueError(
            f"The run has {total_steps} training steps: config.num_epochs={config.num_epochs} of this dataset's "
            f"steps per epoch rounds down to 0. Raise config.num_epochs or set config.num_train_steps."
        )
    start = int(state.step)
    stop = {"signal": None}

    def request_stop(signum, frame):
        if signum == signal.SIGINT and stop["signal"] is not None:
            raise KeyboardInterrupt  # pressed again: the user wants out now, not after the save
        stop["signal"] = signum

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    history, eval_metrics = [], {}
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
                eval_metrics = evaluate(state, step)
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
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        ckpt.close()
        writer.close()
    return eval_metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the final eval metrics."""
    print_config(config)
    config_checks.check_classification(config, workdir, train=True)
    mesh, train_split, eval_split, steps_per_epoch, total_steps, state, ckpt = _setup(config, workdir)
    train_iter = iter(train_split.dataset)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, data_iterator=train_iter, set_aside_damaged=True)
        log.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
    save_config(config, workdir, step=int(state.step))
    train_fn = jax.jit(functools.partial(steps.train_step, label_smoothing=config.label_smoothing), donate_argnums=0)
    eval_fn = jax.jit(steps.eval_step)
    skipped = 0

    def step_fn(state, batch, step):
        nonlocal skipped
        corrupt = int(np.sum(batch.get("corrupt", 0)))
        if corrupt:
            skipped += corrupt
            log.warning("%d corrupt images skipped so far.", skipped)
        return train_fn(state, mesh.shard(batch))

    def evaluate_fn(state, step):
        metrics = run_eval(state, eval_split, mesh, eval_fn)
        report(f"step {step}: eval top-1 {metrics['top1']:.4f} top-5 {metrics['top5']:.4f} loss {metrics['loss']:.4f}")
        return metrics

    eval_metrics = fit(
        config, state=state, train_iter=train_iter, step_fn=step_fn, total_steps=total_steps,
        eval_every=config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch, ckpt=ckpt,
        writer=MetricWriter(workdir, start_step=int(state.step)), evaluate=evaluate_fn,
        learning_rate=optim.learning_rate_schedule(config, steps_per_epoch, total_steps),
    )
    plot_curves(workdir)
    return eval_metrics


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """Restores checkpoint `step` of `workdir` (default: the latest good one) and evaluates it.

    Prints top-1/top-5 and writes them to `<workdir>/eval_<step>.json`, the config to
    `<workdir>/config_eval_<step>.json`.
    """
    print_config(config)
    config_checks.check_classification(config, workdir, train=False)
    mesh, _, eval_split, _, _, state, ckpt = _setup(config, workdir)
    try:
        state = ckpt.restore(state, step)
    finally:
        ckpt.close()
    save_config(config, workdir, step=int(state.step), mode="eval")
    metrics = run_eval(state, eval_split, mesh, jax.jit(steps.eval_step))
    restored = int(state.step)
    report(f"checkpoint step {restored}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  loss {metrics['loss']:.4f}  ({metrics['images']} images)")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{restored}.json"), "w") as f:
            json.dump({"step": restored, **metrics}, f, indent=1)
    return metrics
