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

from absl import app

from cvolution_jax.tasks.classification import Classification
from cvolution_jax.train import cli

cli.define_flags()


def main(argv):
    cli.run(argv, Classification())


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
