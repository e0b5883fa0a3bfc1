"""Initialising a task's backbone from an `experiments.imagenet` run: what detection and
segmentation, whose models hold a registry network under `backbone`, both use."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from cvolution_jax.train import checkpoint
from cvolution_jax.train.loop import report


def load_pretrained(variables: dict, path: str, step: int | None = None) -> dict:
    """`variables` with the backbone's replaced by those of an `experiments.imagenet` checkpoint.

    `path` is that run's workdir (or its `checkpoints` folder). The classifier's `fc` is dropped;
    every other array must match the backbone by name and shape (else CheckpointMismatchError).
    """
    directory = path if os.path.basename(os.path.normpath(path)) == "checkpoints" else os.path.join(path, "checkpoints")
    ckpt = checkpoint.Checkpointer(directory, best_metric="top1")
    try:
        saved = ckpt.restore_variables(step)
    finally:
        ckpt.close()
    out = {collection: dict(tree) for collection, tree in variables.items()}
    for collection in ("params", "batch_stats"):
        backbone = {k: v for k, v in saved.get(collection, {}).items() if k != "fc"}
        checkpoint.check_compatible(backbone, variables[collection]["backbone"], f"{directory} ({collection})")
        out[collection]["backbone"] = jax.tree.map(jnp.asarray, backbone)
    report(f"Backbone initialised from {directory}.")
    return out
