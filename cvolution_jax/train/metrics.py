"""Metric logging of a run: a JSONL file, TensorBoard events and a PNG of the curves.

Every record is `{"step": int, "split": "train" | "eval", <metric>: float, ...}`, one strict JSON
object per line in `<workdir>/metrics.jsonl` (an undefined value, such as the IoU of a class absent
from the eval set, is `null`, not a bare NaN); the same scalars go to TensorBoard under `<workdir>/tensorboard`
as `<split>/<metric>`. Only process 0 writes.

A resumed run repeats the steps after its checkpoint, so the writer first drops what a killed run
logged after that step (and TensorBoard purges those events): each step is logged once.
"""

from __future__ import annotations

import json
import logging
import os

import jax

from cvolution_jax import files

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends records to `<workdir>/metrics.jsonl` and TensorBoard.

    Args:
      start_step: the step the run starts from (a resumed run's checkpoint); records of later
        steps, written by a run killed before it could checkpoint them, are dropped.
    """

    def __init__(self, workdir: str, start_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self._tensorboard = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._drop_after(start_step)
            from tensorboardX import SummaryWriter  # imported here: only process 0 writes events

            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

    def _drop_after(self, step: int) -> None:
        """Rewrites metrics.jsonl without the records after `step` and without lines that are not
        records (a line cut short by a kill, or an edit), saying how many of each it dropped."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        records = [_record(line) for line in lines]
        kept = [line for line, record in zip(lines, records) if record is not None and record["step"] <= step]
        if len(kept) == len(lines):
            return
        unreadable = sum(record is None for record in records)
        if unreadable:
            log.warning("%s: dropped %d line(s) that are not metrics records (JSON objects with an int step and a split; "
                        "a line cut short by a kill, or an edit).", self.path, unreadable)
        if len(lines) - unreadable > len(kept):
            log.info("%s: dropped %d record(s) after step %d, the step this run resumes from.", self.path,
                     len(lines) - unreadable - len(kept), step)
        temporary = self.path + ".tmp"
        with open(temporary, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)  # a kill now leaves the old file or the new one, never half

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(files.strict_json(record), allow_nan=False) + "\n")  # NaN (a class absent) as null
        for name, value in metrics.items():
            self._tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _record(line: str) -> dict | None:
    """The metrics record of one line of metrics.jsonl, or None if the line is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or type(record.get("step")) is not int or not isinstance(record.get("split"), str):
        return None
    return record


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl`, in order; a line that is not one is left out."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [record for record in map(_record, f) if record is not None]


CLASSIFICATION_SCORES = (("train", "top1", "train top-1"), ("eval", "top1", "eval top-1"), ("eval", "top5", "eval top-5"))


def plot_curves(workdir: str, filename: str = "curves.png", scores=CLASSIFICATION_SCORES, score_title: str = "accuracy") -> str | None:
    """Draws loss and scores against step from `metrics.jsonl`; returns the PNG path.

    `scores`: `(split, key, label)` of each curve of the right panel (values in [0, 1]); a split
    whose records lack a key is skipped, and so is an eval without a loss.
    """
    records = read_metrics(workdir)
    if not records or jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        rows = [r for r in records if r["split"] == split and "loss" in r]
        if rows:
            loss_ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], style, label=split)
    for split, key, label in scores:
        rows = [r for r in records if r["split"] == split and key in r]
        if rows:
            acc_ax.plot([r["step"] for r in rows], [r[key] for r in rows], "-" if split == "train" else "o-", label=label)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    acc_ax.set(xlabel="step", ylabel=score_title, title=score_title, ylim=(0, 1))
    loss_ax.legend(), acc_ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
