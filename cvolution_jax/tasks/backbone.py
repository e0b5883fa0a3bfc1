"""A task's registry backbone: its config check (every task), and its initialisation from an
`experiments.imagenet` run (detection and segmentation, whose models hold it under `backbone`)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from cvolution_jax import models
from cvolution_jax.train import checkpoint
from cvolution_jax.train.config_checks import ConfigError, get_field
from cvolution_jax.train.loop import report


def check_backbone(config: ml_collections.ConfigDict, name_path: str, overrides_path: str) -> models.ResNet:
    """The registry model `config.<name_path>` built with the ResNet fields `config.<overrides_path>`
    (stage_sizes, widths, stem_width, ...); ConfigError naming both if it cannot be built."""
    name, overrides = get_field(config, name_path), dict(get_field(config, overrides_path))
    try:
        return models.create(name, num_classes=1, **overrides)
    except ValueError as error:
        raise ConfigError(
            f"config.{name_path}={name!r} with config.{overrides_path}={overrides}: {error}"
        ) from error


def checkpoints_of(path: str) -> str:
    """The checkpoints folder of `config.model.pretrained`: a run's workdir or that folder itself."""
    return path if os.path.basename(os.path.normpath(path)) == "checkpoints" else os.path.join(path, "checkpoints")


def check_pretrained(path: str) -> None:
    """FileNotFoundError unless `config.model.pretrained` (when set) holds checkpoints: said before the
    task writes or reads its data, and without making a folder where there was none."""
    if not path:
        return
    directory = checkpoints_of(path)
    if not os.path.isdir(directory) or not os.listdir(directory):
        raise FileNotFoundError(
            f"config.model.pretrained={path!r}: no checkpoint in {directory}. Give the --workdir of a finished "
            f"experiments.imagenet run of the backbone (or '' to train it from scratch).")


def load_pretrained(variables: dict, path: str, step: int | None = None) -> dict:
    """`variables` with the backbone's replaced by those of an `experiments.imagenet` checkpoint.

    `path` is that run's workdir (or its `checkpoints` folder). The classifier's `fc` is dropped;
    every other array must match the backbone by name and shape (else CheckpointMismatchError).
    """
    directory = checkpoints_of(path)
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
