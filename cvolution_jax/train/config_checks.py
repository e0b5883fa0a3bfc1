"""Config checks run before a run builds its data or model: a mistake fails in a second, naming its field.

    config_checks.check_run(config, workdir, train=True)     # every task's loop

The tasks check their own fields with these pieces (`cvolution_jax.tasks.<task>.check_<task>`).

Each check raises `ConfigError` (a ValueError, which the entry points print as one `error:` line)
saying which field was wrong, what it holds, what was expected and how to fix it on the command line.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import ml_collections

from cvolution_jax.train.loop import compute_dtype
from kernels import common


class ConfigError(ValueError):
    """A config field (or the workdir) that the run cannot use."""


def is_int(value) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def get_field(config: ml_collections.ConfigDict, path: str) -> Any:
    value = config
    for key in path.split("."):
        value = value[key]
    return value


def check_int(config: ml_collections.ConfigDict, path: str, minimum: int, why: str = "") -> None:
    """Raises ConfigError unless `config.<path>` is an int >= `minimum`."""
    value = get_field(config, path)
    if not is_int(value) or value < minimum:
        raise ConfigError(f"config.{path} must be an int >= {minimum}{why}; got {value!r}. Set --config.{path}=N.")


def check_int_or_unset(config: ml_collections.ConfigDict, path: str, why: str) -> None:
    """Raises ConfigError unless `config.<path>` is -1 (unset: `why` says what then) or an int >= 1."""
    value = get_field(config, path)
    if not is_int(value) or (value != -1 and value < 1):
        raise ConfigError(f"config.{path} must be -1 ({why}) or an int >= 1; got {value!r}. Set --config.{path}=N.")


def check_size(config: ml_collections.ConfigDict, path: str) -> None:
    """Raises ConfigError unless `config.<path>` is a positive size: N, or (H, W) of positive ints."""
    value = get_field(config, path)
    sizes = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(sizes) not in (1, 2) or not all(is_int(n) and n >= 1 for n in sizes):
        raise ConfigError(f"config.{path} must be a size in pixels >= 1 (N or (H, W)); got {value!r}. Set --config.{path}=N.")


def check_workdir(workdir: str, *, create: bool = True) -> None:
    """Creates `workdir` if needed (`create`; else a missing one is left for the checkpoint restore
    to report) and writes a probe file there (`kernels.common.write_error`); ConfigError if either fails."""
    if not workdir:
        raise ConfigError("--workdir is empty; give the directory for checkpoints, metrics and the config.")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; give a directory (it is created if missing).")
    if not create and not os.path.exists(workdir):
        return
    error = common.write_error(workdir)
    if error:
        raise ConfigError(
            f"--workdir {workdir} cannot be written ({error.strerror or error}); give a directory this user can write."
        ) from error


def check_run(config: ml_collections.ConfigDict, workdir: str, *, train: bool) -> None:
    """The fields every task's loop (`cvolution_jax.train.loop.fit`) reads, and the workdir.

    `train`: whether the run trains (a training length is only needed then).
    """
    check_int(config, "batch_size", 1, " (the global batch)")
    try:
        compute_dtype(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_int_or_unset(config, "num_train_steps", "unset: config.num_epochs says how long")
    check_int_or_unset(config, "eval_every_steps", "once per epoch")
    check_int_or_unset(config, "checkpoint_step", "the latest checkpoint")
    if not (isinstance(config.base_lr, (int, float)) and config.base_lr > 0):
        raise ConfigError(f"config.base_lr must be > 0; got {config.base_lr!r}. Set --config.base_lr=LR.")
    if train and not (config.num_train_steps > 0 or config.num_epochs > 0):
        raise ConfigError(
            f"config.num_epochs is {config.num_epochs} and config.num_train_steps {config.num_train_steps}: nothing to "
            f"train. Set --config.num_epochs > 0, or --config.num_train_steps > 0 (which overrides it)."
        )
    check_int(config, "log_every_steps", 1)
    check_int(config, "checkpoint_every_steps", 1, " (a number above the run's steps saves at evaluations and at the end only)")
    check_int(config, "keep_checkpoints", 0, " (how many of the latest checkpoints to keep besides the best)")
    check_workdir(workdir, create=train)
