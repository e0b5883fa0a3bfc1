"""Metric logging of a run: a JSONL file, TensorBoard events and a PNG of the curves.

Every record is `{"step": int, "split": "train" | "eval", <metric>: float, ...}`, one JSON object
per line in `<workdir>/metrics.jsonl`; the same scalars go to TensorBoard under `<workdir>/tensorboard`
as `<split>/<metric>`. Only process 0 writes.
"""

from __future__ import annotations

import json
import os

import jax


class MetricWriter:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self._tensorboard = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter  # imported here: only process 0 writes events

            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            self._tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
