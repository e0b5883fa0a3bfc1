"""A seeded ablation: a grid of classification runs (rows x seeds) with one recipe, then its table.

    python -m experiments.ablation --config experiments/configs/ablation_fashion_mnist.py --workdir runs/ablation
    python -m experiments.ablation --config experiments/configs/ablation_fashion_mnist.py --workdir runs/ablation \
        --config.rows="('resnet', 'cednet')" --config.seeds="(0,)"     # a part of the grid

The config is a study (the config file's `get_config()`): `recipe` (an `experiments.imagenet`
config without its model and seed), `models` (row -> `{"name", "overrides"}`), `rows` and `seeds`
to run. Run `(row, seed)` is an ordinary classification run of `common.study_run(study, row, seed)`
in `<workdir>/<row>/seed_<seed>`: its checkpoints, metrics and resume work as usual, and once trained
its final checkpoint is evaluated (`eval_<step>.json`, as `--config.mode=eval` writes it).

Rerunning the command resumes the grid: a run with its eval file is read, not retrained (also
once its checkpoints are deleted to save space); a run
stopped part-way resumes from its checkpoint; a run whose final checkpoint is damaged is retrained
from its newest good one, the damaged one set aside in `checkpoints_damaged/`. SIGTERM or Ctrl-C
stops the grid after the current run saves. When every run of `rows` x `seeds` is done the study
writes, in `<workdir>`:
- `results.json`: per row its model, op switches, params and MACs (`cvolution_jax.count`, on one
  image of the dataset's shape), test top-1 per seed, mean and sample standard deviation, CPU
  training images/s and minutes per run; and every pair of rows compared (Welch's t-test); strict
  JSON, `null` where a value is undefined (the std of one seed, the p of two constant rows);
- `results.md`: the same as tables;
- `results.png`: mean top-1 with +-1 std error bars against parameters, one marker per row.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import math
import os
import sys
import time

import jax

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from scipy import stats

from cvolution_jax import count, data, files, models
from cvolution_jax.tasks import classification
from cvolution_jax.train import checkpoint, cli, loop, workdir_lock
from cvolution_jax.train.metrics import read_metrics
from experiments.configs import common
from kernels.bench import versions

log = logging.getLogger(__name__)

SIGNIFICANCE = 0.05  # a difference of two rows' means "exceeds the seeds' spread" below this p-value
TIMING_FILE = "timing.json"  # in each run's workdir: wall seconds of its training, summed over invocations


def run_dir(workdir: str, row: str, seed: int) -> str:
    return os.path.join(workdir, row, f"seed_{seed}")


def check_study(study: ml_collections.ConfigDict) -> None:
    """ValueError naming what is wrong with the study's rows or seeds."""
    for field in ("recipe", "models", "rows", "seeds"):
        if field not in study:
            raise ValueError(
                f"The config has no field {field!r}: experiments.ablation takes a study config (recipe, models, rows, "
                f"seeds), e.g. experiments/configs/ablation_fashion_mnist.py.")
    unknown = [row for row in study.rows if row not in study.models]
    if unknown or not study.rows:
        raise ValueError(f"config.rows {tuple(study.rows)!r} must be a non-empty subset of the rows {', '.join(study.models)}.")
    seeds = list(study.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"config.seeds must be distinct non-negative ints, e.g. (0, 1, 2); got {tuple(seeds)!r}.")


def total_steps(config: ml_collections.ConfigDict) -> int:
    """The training steps of a run of `config` (its train split's size, the batch and the epochs)."""
    split = data.create_split(config.data, train=True, batch_size=config.batch_size, seed=config.seed,
                              process_index=0, process_count=1)
    return loop.schedule_length(config, split.num_examples)[1]


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _latest_step(workdir: str) -> int | None:
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


class RunMismatchError(ValueError):
    """A run's workdir holds a run of another config than the study's."""


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with the fields it lacks taken from `defaults`, at any depth."""
    merged = dict(defaults)
    for key, value in saved.items():
        nested = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        merged[key] = _with_defaults(value, defaults[key]) if nested else value
    return merged


def _check_same_run(config: ml_collections.ConfigDict, workdir: str, trained: int | None, last: int) -> None:
    """RunMismatchError when `workdir` was trained with another config, or past this run's last step.

    A field added to the configs after the run was trained counts at its default
    (`common.base_config`), with which the run did train: a grid survives new config fields."""
    saved = _read_json(os.path.join(workdir, "config.json"))
    current = json.loads(config.to_json_best_effort())
    defaults = json.loads(common.base_config().to_json_best_effort())
    differences = [] if saved is None else loop.config_differences(_with_defaults(saved, defaults), current)
    if differences or (trained or 0) > last:
        found = "; ".join(differences) if differences else f"a checkpoint of step {trained}, past the run's {last} steps"
        raise RunMismatchError(
            f"{workdir} holds a run of another recipe ({found}). Give the study a new --workdir, or "
            f"restore the recipe it was trained with.")


def train_and_test(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """Trains run `config` in `workdir` (resuming it) and evaluates its last checkpoint.

    Returns the eval metrics (`eval_<last step>.json`, written by `loop.evaluate`), or None when
    training stopped early (a signal): the checkpoint it saved resumes it next time.
    """
    task = classification.Classification()
    task.check_config(config, workdir, train=True)
    last = total_steps(config)
    trained = _latest_step(workdir)
    _check_same_run(config, workdir, trained, last)
    eval_path = os.path.join(workdir, f"eval_{last}.json")
    metrics = _read_json(eval_path)
    if metrics is not None and trained in (last, None):
        if trained is None:  # its checkpoints were deleted (to save space): the result stays, as recorded
            log.info("Ablation run %s has no checkpoints left; its result is read from %s, not retrained.", workdir, eval_path)
        return metrics
    if trained != last and not _train(task, config, workdir, last):
        return None
    try:
        loop.evaluate(task, config, workdir, last)
    except checkpoint.DamagedCheckpointError as error:
        # Training restores the newest good checkpoint and sets the damaged ones aside
        # (checkpoints_damaged/), so retraining the steps after it replaces the final checkpoint.
        log.warning("Ablation run %s: its final checkpoint cannot be restored (%s). The study retrains the run from "
                    "its newest good checkpoint instead.", workdir, error)
        if not _train(task, config, workdir, last):
            return None
        loop.evaluate(task, config, workdir, last)
    return _read_json(eval_path)


def _train(task, config: ml_collections.ConfigDict, workdir: str, last: int) -> bool:
    """Trains (or resumes) the run in `workdir`, adding the time to its timing file; whether it
    reached step `last` (False: stopped by a signal, resumed next time)."""
    start = time.perf_counter()
    try:
        loop.train_and_evaluate(task, config, workdir)
    finally:  # the time of a run stopped part-way counts when it resumes
        timing = read_timing(workdir) or {"train_seconds": 0.0, "invocations": 0}
        spent = time.perf_counter() - start
        timing = {"train_seconds": None if timing["train_seconds"] is None else timing["train_seconds"] + spent,
                  "invocations": timing["invocations"] + 1}
        with files.atomic_open(os.path.join(workdir, TIMING_FILE)) as f:
            json.dump(timing, f)
    return _latest_step(workdir) == last


def read_timing(workdir: str) -> dict | None:
    """`{"train_seconds", "invocations"}` of a run's timing file; None for a run that has none.
    A file that is not one (damaged, edited) makes the run's time unknown (`train_seconds` None,
    `null` in results.json, from then on), with a warning: the time it held is lost, and a sum
    without it would understate the run."""
    path = os.path.join(workdir, TIMING_FILE)
    if not os.path.exists(path):
        return None
    timing = _read_json(path)
    if (isinstance(timing, dict) and isinstance(timing.get("invocations"), int)
            and (timing.get("train_seconds") is None or isinstance(timing.get("train_seconds"), (int, float)))):
        return timing
    log.warning("%s is not a timing record ({\"train_seconds\": S, \"invocations\": N}); this run's training time is "
                "unknown from now on (minutes null in results.json).", path)
    return {"train_seconds": None, "invocations": 0}


def images_per_sec(workdir: str) -> float:
    """Median training throughput of a run's logged intervals (robust to the first one, which
    includes compilation, and to those that include an evaluation)."""
    rates = [r["images_per_sec"] for r in read_metrics(workdir) if r["split"] == "train" and "images_per_sec" in r]
    return float(np.median(rates)) if rates else float("nan")


def describe(model: ml_collections.ConfigDict) -> dict:
    """The op of a row's model config (its registry model's, with the row's overrides) and, for
    C-volution, its two switches, for the table."""
    op = models.create(model.name, num_classes=1, **dict(model.overrides)).op
    if op.kind == "cvolution":
        return {"op": op.kind, "context": op.context, "channel_branch": op.channel_branch}
    name = f"conv{op.kernel_size}x{op.kernel_size}" if op.kind == "conv" else op.kind
    return {"op": name, "context": "-", "channel_branch": False}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` for testing them together (NaN stays NaN)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = list(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def compare(rows: list[dict]) -> list[dict]:
    """Every pair of rows: difference of mean top-1 (points), Welch's t-test p-value over the seeds,
    that p Holm-adjusted over all pairs, and whether the difference exceeds the seeds' spread
    (adjusted p < SIGNIFICANCE). With one seed in a row there is no spread: p is NaN."""
    pairs = []
    for a, b in itertools.combinations(rows, 2):
        x, y = a["top1"], b["top1"]
        p = float("nan")
        if len(x) > 1 and len(y) > 1:
            p = float(stats.ttest_ind(x, y, equal_var=False).pvalue)
            if math.isnan(p):  # both rows constant: equal means differ by nothing, unequal ones always
                p = 1.0 if a["mean"] == b["mean"] else 0.0
        pairs.append({"a": a["row"], "b": b["row"], "difference": a["mean"] - b["mean"], "p": p})
    for pair, adjusted in zip(pairs, holm([pair["p"] for pair in pairs])):
        pair["p_holm"] = adjusted
        pair["exceeds_spread"] = bool(adjusted < SIGNIFICANCE)
    return pairs


def summarize(study: ml_collections.ConfigDict, workdir: str, results: dict, command: str = "") -> dict:
    """The table: one entry per row from the runs' eval metrics (`results[row][seed]`); per-seed
    values are lists in the order of `study.seeds`. `command` is what produced it, for the record."""
    recipe = study.recipe
    split = data.create_split(recipe.data, train=False, batch_size=recipe.batch_size, seed=0, process_index=0, process_count=1)
    channels = split.image_shape[-1]
    rows = []
    for row in study.rows:
        config = common.study_run(study, row, study.seeds[0])
        model = classification.create_model(config, split.num_classes)
        counted = count.count(model, split.image_shape[:2], lambda image: image[..., :channels])
        top1 = [100.0 * results[row][seed]["top1"] for seed in study.seeds]
        timings = [read_timing(run_dir(workdir, row, seed)) or {"train_seconds": None} for seed in study.seeds]
        minutes = [float("nan") if t["train_seconds"] is None else t["train_seconds"] / 60 for t in timings]
        rows.append({
            "row": row, "model": config.model.name, **describe(config.model),
            "params": counted["params"], "macs": counted["macs"],
            "top1": top1, "mean": float(np.mean(top1)),
            "std": float(np.std(top1, ddof=1)) if len(top1) > 1 else float("nan"),
            "images": int(results[row][study.seeds[0]]["images"]),
            "images_per_sec": float(np.mean([images_per_sec(run_dir(workdir, row, seed)) for seed in study.seeds])),
            "minutes": minutes,
        })
    environment = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
                   "cpu_count": os.cpu_count(), **versions(), "command": command}
    return {"rows": rows, "comparisons": compare(rows), "seeds": list(study.seeds),
            "split": "validation" if recipe.data.get("validation_size", 0) > 0 else "test",
            "environment": environment, "recipe": json.loads(recipe.to_json_best_effort())}


def markdown(summary: dict) -> str:
    env, seeds = summary["environment"], summary["seeds"]
    per_seed = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"Measured {env['date']} on {env['device']} ({env['cpu_count']} cores), jax {env['jax']}, python "
             f"{env['python']}: `{env['command']}`. Top-1 (%) on the {summary['split']} split "
             f"({summary['rows'][0]['images']} images); std over the seeds (sample std).", "",
             f"| row | op | context | channel branch | params | MACs | {per_seed} | top-1 mean ± std | train images/s |",
             "|---|---|---|---|---|---|" + "---|" * len(seeds) + "---|---|"]
    for r in summary["rows"]:
        std = "n/a" if math.isnan(r["std"]) else f"{r['std']:.2f}"
        lines.append(f"| {r['row']} | {r['op']} | {r['context']} | {'yes' if r['channel_branch'] else 'no'} | "
                     f"{r['params']:,} | {r['macs'] / 1e6:.2f}M | {' | '.join(f'{v:.2f}' for v in r['top1'])} | "
                     f"{r['mean']:.2f} ± {std} | {r['images_per_sec']:.0f} |")
    lines += ["", "Minutes of each run's training (its per-epoch evaluations included), summed over resumed parts:", "",
              f"| row | {per_seed} |", "|---|" + "---|" * len(seeds)]
    lines += [f"| {r['row']} | {' | '.join(f'{m:.1f}' for m in r['minutes'])} |" for r in summary["rows"]]
    lines += ["", f"Differences of mean top-1 (points, row a minus row b): Welch's t-test over the seeds, its p "
              f"Holm-adjusted over the {len(summary['comparisons'])} pairs; \"exceeds spread\" when the adjusted p < "
              f"{SIGNIFICANCE}:", "", "| a | b | a - b | p | p (Holm) | exceeds spread |", "|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(f"| {c['a']} | {c['b']} | {c['difference']:+.2f} | {c['p']:.3f} | {c['p_holm']:.3f} | "
                     f"{'yes' if c['exceeds_spread'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    """Mean top-1 against parameters, +-1 std error bars, one marker per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = itertools.cycle("osD^v<>ph*")
    for r in summary["rows"]:
        ax.errorbar(r["params"] / 1e3, r["mean"], yerr=0.0 if math.isnan(r["std"]) else r["std"], fmt=next(markers),
                    capsize=4, label=r["row"])
    ax.set(xlabel="parameters (thousands)", ylabel=f"{summary['split']} top-1 (%)",
           title=f"mean ± std over {len(summary['seeds'])} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def keep_other_results(workdir: str, summary: dict) -> str | None:
    """Before `summary` is written: results of another table (other rows or seeds, e.g. the whole
    grid before a part of it is run alone) are renamed `results_previous_<time>.{json,md,png}`, with
    a warning, never replaced. The same table is rewritten in place. Returns the new stem, if any."""
    previous = _read_json(os.path.join(workdir, "results.json"))
    if previous is None:
        return None
    table = lambda summary: ([row.get("row") for row in summary.get("rows", [])], summary.get("seeds"))  # noqa: E731
    if isinstance(previous, dict) and table(previous) == table(summary):
        return None
    stem = os.path.join(workdir, time.strftime("results_previous_%Y%m%d-%H%M%S"))
    for suffix in (".json", ".md", ".png"):
        if os.path.exists(os.path.join(workdir, "results" + suffix)):
            os.replace(os.path.join(workdir, "results" + suffix), stem + suffix)
    log.warning("%s held the results of another table (rows and seeds %s); kept as %s.json (and .md, .png) beside the "
                "new one.", os.path.join(workdir, "results.json"), table(previous) if isinstance(previous, dict) else "?", stem)
    return stem


def run_study(study: ml_collections.ConfigDict, workdir: str, command: str = "") -> dict | None:
    """Runs (or reads) every run of the grid, then writes the results of `study.rows` x `study.seeds`
    (a part of the grid run alone writes its own table, and the other table is kept:
    `keep_other_results`); returns the summary, or None when the grid stopped early (rerun to
    resume). `command` is recorded with the results.

    SIGTERM or Ctrl-C stop the grid once the current run has saved (a training run) or finished (an
    evaluation); a second Ctrl-C raises KeyboardInterrupt at once.
    """
    check_study(study)
    results = {}
    with loop.stop_requests() as stop:
        # Seed by seed, so a grid run in parts has whole tables of the first seeds early.
        for seed, row in itertools.product(study.seeds, study.rows):
            loop.report(f"ablation: {row}, seed {seed}")
            try:
                metrics = train_and_test(common.study_run(study, row, seed), run_dir(workdir, row, seed))
            except (ValueError, FileNotFoundError, loop.DivergedError, workdir_lock.WorkdirInUse) as error:
                raise ValueError(f"ablation run {row}/seed_{seed}: {error} (a study sets a run's fields as "
                                 f"--config.recipe.FIELD)") from error
            if metrics is None or stop["signal"] is not None:
                loop.report(f"ablation: stopped at {row}, seed {seed}; rerun the same command to resume the grid.")
                return None
            results.setdefault(row, {})[seed] = metrics
    summary = summarize(study, workdir, results, command)
    keep_other_results(workdir, summary)
    with files.atomic_open(os.path.join(workdir, "results.json")) as f:
        json.dump(files.strict_json(summary), f, indent=1, allow_nan=False)  # an undefined std or p as null
    with files.atomic_open(os.path.join(workdir, "results.md")) as f:
        f.write(markdown(summary))
    plot(summary, os.path.join(workdir, "results.png"))
    loop.report(markdown(summary))
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    with cli.exits_with_a_message(flags.FLAGS.workdir):
        run_study(flags.FLAGS.config, flags.FLAGS.workdir, " ".join(["python -m experiments.ablation", *sys.argv[1:]]))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "A study config file, e.g. experiments/configs/ablation_fashion_mnist.py.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "The study's directory: one sub-directory per run, and the results.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)
