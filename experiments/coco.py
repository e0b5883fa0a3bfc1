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

from absl import app, flags

from cvolution_jax.tasks.detection import Detection
from cvolution_jax.train import cli

cli.define_flags()
flags.DEFINE_integer("vis", 0, "Draw this many eval images with predicted and ground-truth boxes (final evaluation).", lower_bound=0)
FLAGS = flags.FLAGS


def main(argv):
    cli.run(argv, Detection(vis=FLAGS.vis))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
