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

from absl import app, flags
from ml_collections import config_flags

from cvolution_jax.train import distributed, loop

config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    distributed.initialize_from_flags()
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
