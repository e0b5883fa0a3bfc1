"""Image classification: train, resume and evaluate a registry model from a config.

    python -m experiments.imagenet --config experiments/configs/default.py --workdir runs/default
    python -m experiments.imagenet --config experiments/configs/cednet50.py --workdir runs/cednet50 \
        --config.data.data_dir=/data/imagenet --config.batch_size=1024 --config.dtype=bfloat16
    python -m experiments.imagenet --config experiments/configs/cednet50.py --workdir runs/cednet50 \
        --config.mode=eval [--config.checkpoint_step=N]

Rerunning a training command with the same workdir resumes from its latest checkpoint.

Several hosts (one process per host, all running the same command): `--multihost` calls
`jax.distributed.initialize()`, which reads the cluster from SLURM, Open MPI or Kubernetes;
or give it explicitly with `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from cvolution_jax.train import distributed, loop

config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.DEFINE_bool("multihost", False, "Initialise jax.distributed from the cluster environment (SLURM, Open MPI, Kubernetes).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator; with --num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer("heartbeat_timeout_seconds", distributed.HEARTBEAT_TIMEOUT_SECONDS, "Multi-process: fail after a peer is silent this long.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together; give all three.")
        distributed.initialize(*explicit, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    elif FLAGS.multihost:
        distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    config = FLAGS.config
    try:
        if config.mode == "train":
            loop.train_and_evaluate(config, FLAGS.workdir)
        elif config.mode == "eval":
            loop.evaluate(config, FLAGS.workdir, None if config.checkpoint_step < 0 else config.checkpoint_step)
        else:
            raise ValueError(f"--config.mode must be 'train' or 'eval'; got {config.mode!r}.")
    except (loop.DivergedError, FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
