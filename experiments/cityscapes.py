"""Semantic segmentation: train, resume and evaluate Semantic FPN or UPerNet from a config, the mmseg way.

    python -m experiments.cityscapes --config experiments/configs/segmentation_default.py --workdir runs/seg_default
    python -m experiments.cityscapes --config experiments/configs/fpn_rednet50_neck_512x1024_80k_cityscapes.py \
        --workdir runs/fpn_rednet50_neck --config.data.data_dir=/data/cityscapes --config.model.pretrained=runs/rednet50
    python -m experiments.cityscapes --config experiments/configs/segmentation_default.py --workdir runs/seg_default \
        --config.mode=eval [--config.checkpoint_step=N] --vis 8

Named after the paper's segmentation benchmark; the embedded defaults (`segmentation_default.py`
on synthetic shapes, `segmentation_nuclei.py` on a real sample) need no download. Training
evaluates every `eval_every_steps` and at the end: mIoU, mAcc, aAcc and mmseg's per-class IoU
table over the whole eval set. Rerunning a training command with the same workdir resumes from
its latest checkpoint. `--vis N` writes N eval images (image, ground truth, prediction in the
Cityscapes palette) to `<workdir>/eval_<step>/`. Multi-host flags as in `experiments.imagenet`.
"""

from absl import app, flags

from cvolution_jax.tasks.segmentation import Segmentation
from cvolution_jax.train import cli

cli.define_flags()
flags.DEFINE_integer("vis", 0, "Draw this many eval images with predicted and ground-truth label maps (final evaluation).", lower_bound=0)
FLAGS = flags.FLAGS


def main(argv):
    cli.run(argv, Segmentation(vis=FLAGS.vis))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
