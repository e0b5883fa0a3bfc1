"""What the training entry points (`experiments.imagenet`, `experiments.coco`) share: flags and main().

    cli.define_flags()                                   # at import, before absl parses
    app.run(lambda argv: cli.run(argv, train_and_evaluate, evaluate))

`--config` (an ml_collections config file; `config.mode` "train" or "eval"), `--workdir`, and
the multi-process flags: `--multihost` calls `jax.distributed.initialize()`, which reads the
cluster from SLURM, Open MPI or Kubernetes; or `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` give it explicitly.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

from cvolution_jax.train import distributed
from cvolution_jax.train.loop import DivergedError


def define_flags() -> None:
    """Defines the flags every entry point takes."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
    flags.DEFINE_bool("multihost", False, "Initialise jax.distributed from the cluster environment (SLURM, Open MPI, Kubernetes).")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator; with --num_processes and --process_id.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the run.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.DEFINE_integer("heartbeat_timeout_seconds", distributed.HEARTBEAT_TIMEOUT_SECONDS, "Multi-process: fail after a peer is silent this long.")
    flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
    FLAGS = flags.FLAGS
    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together; give all three.")
        distributed.initialize(*explicit, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    elif FLAGS.multihost:
        distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)


def run(argv, train: Callable, evaluate: Callable) -> None:
    """The body of an entry point's main: `train(config, workdir)` or `evaluate(config, workdir,
    step)` as `config.mode` says. A user error (bad config, missing checkpoint, divergence)
    exits with its message rather than a traceback."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    _initialize_distributed()
    FLAGS = flags.FLAGS
    config = FLAGS.config
    try:
        if config.mode == "train":
            train(config, FLAGS.workdir)
        elif config.mode == "eval":
            evaluate(config, FLAGS.workdir, None if config.checkpoint_step < 0 else config.checkpoint_step)
        else:
            raise ValueError(f"--config.mode must be 'train' or 'eval'; got {config.mode!r}.")
    except (DivergedError, FileNotFoundError, ValueError) as error:  # CheckpointMismatchError is a ValueError
        sys.exit(f"error: {error}")
