"""Object detection: train, resume and evaluate Faster R-CNN (FPN) from a config, the COCO way.

    python -m experiments.coco --config experiments/configs/coco_default.py --workdir runs/coco_default
    python -m experiments.coco --config experiments/configs/faster_rcnn_cednet50_fpn_1x.py --workdir runs/frcnn \
        --config.data.data_dir=/data/coco --config.model.pretrained=runs/cednet50
    python -m experiments.coco --config experiments/configs/coco_default.py --workdir runs/coco_default \
        --config.mode=eval [--config.checkpoint_step=N] --vis 8

Training evaluates once per epoch (and at the end) with pycocotools' COCOeval, printing its
12-number bbox summary; the detections of each evaluation go to `<workdir>/eval_<step>/detections.json`
(COCO results format). Rerunning a training command with the same workdir resumes from its
latest checkpoint. `--vis N` draws N eval images (predictions beside ground truth) as PNGs
next to the detections. Multi-host flags as in `experiments.imagenet`.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from cvolution_jax.detection import loop
from cvolution_jax.train import checkpoint, distributed

config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, detections and the resolved config.")
flags.DEFINE_integer("vis", 0, "Draw this many eval images with predicted and ground-truth boxes (final evaluation).")
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
            loop.train_and_evaluate(config, FLAGS.workdir, vis=FLAGS.vis)
        elif config.mode == "eval":
            loop.evaluate(config, FLAGS.workdir, None if config.checkpoint_step < 0 else config.checkpoint_step, vis=FLAGS.vis)
        else:
            raise ValueError(f"--config.mode must be 'train' or 'eval'; got {config.mode!r}.")
    except (loop.DivergedError, FileNotFoundError, ValueError, checkpoint.CheckpointMismatchError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
