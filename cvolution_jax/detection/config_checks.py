"""Checks of a detection config before `cvolution_jax.tasks.detection` builds data or model.

    config_checks.check_detection(config, workdir, train=True)

The shared fields and the workdir are `cvolution_jax.train.config_checks.check_run`'s; this adds
the detector's: image scale and buckets, the backbone, and the channel counts the ops need.
"""

from __future__ import annotations

import ml_collections

from cvolution_jax import ops
from cvolution_jax.train.config_checks import ConfigError, check_backbone, check_int, check_run, check_size, is_int

NUM_STAGES = 4  # the FPN reads C2-C5


# The names of cvolution_jax.tasks.detection.DETECTORS (a test keeps them equal): checked here,
# before the task writes or reads any data.
DETECTOR_NAMES = ("faster_rcnn", "mask_rcnn")


def check_detection(config: ml_collections.ConfigDict, workdir: str, *, train: bool) -> None:
    """Every field `cvolution_jax.tasks.detection` reads before it builds anything, then the workdir."""
    cfg = config.data
    if config.model.detector not in DETECTOR_NAMES:
        raise ConfigError(f"config.model.detector must be one of {', '.join(DETECTOR_NAMES)}; got {config.model.detector!r}.")
    check_size(config, "data.scale")
    buckets = tuple(cfg.buckets)
    if not buckets or not all(isinstance(b, (tuple, list)) and len(b) == 2 and all(is_int(n) and n >= 1 for n in b)
                              for b in buckets):
        raise ConfigError(
            f"config.data.buckets must be one or more padded (H, W) shapes of positive ints, e.g. ((800, 1344), "
            f"(1344, 800)); got {cfg.buckets!r}."
        )
    check_int(config, "data.max_gt", 1, " (ground-truth slots per image)")
    if config.model.detector == "mask_rcnn":
        check_int(config, "data.mask_size", 1, " (Mask R-CNN trains on each object's mask cropped to M x M; 56 in the "
                  "Mask R-CNN configs)")
    if cfg.name == "shapes":
        check_int(config, "data.image_size", 1, " (the synthetic shapes' image size)")
    model = config.model
    backbone = check_backbone(config, "model.backbone", "model.backbone_overrides")
    if len(backbone.stage_sizes) != NUM_STAGES:
        raise ConfigError(
            f"config.model.backbone_overrides gives the backbone {len(backbone.stage_sizes)} stages "
            f"(stage_sizes {tuple(backbone.stage_sizes)}); the FPN takes C2-C5, so give {NUM_STAGES}."
        )
    check_int(config, "model.channels", 1)
    check_int(config, "model.fc_dim", 1)
    ops_on_channels = [f"{field}={model[field]!r}" for field in ("neck_op", "rpn_op") if model[field] != "conv"]
    if model.detector == "mask_rcnn" and model.mask_op != "conv":
        ops_on_channels.append(f"mask_op={model.mask_op!r}")
        if model.mask_channels != model.channels:
            raise ConfigError(
                f"config.model.mask_op={model.mask_op!r} keeps the FPN's channels, so config.model.mask_channels "
                f"({model.mask_channels}) must equal config.model.channels ({model.channels}); set both alike."
            )
    if ops_on_channels and model.channels % ops.GROUP_CHANNELS:
        raise ConfigError(
            f"config.model.channels must be a multiple of {ops.GROUP_CHANNELS} with {', '.join(ops_on_channels)} "
            f"(one kernel per {ops.GROUP_CHANNELS} channels); got {model.channels}."
        )
    check_run(config, workdir, train=train)
