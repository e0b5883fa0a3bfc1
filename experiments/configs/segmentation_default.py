"""The embedded segmentation default: a small Semantic FPN with a C-volution FPN neck on the
synthetic shapes' semantic labels, on CPU.

    python -m experiments.cityscapes --config experiments/configs/segmentation_default.py --workdir runs/seg_default --vis 8

Data with nothing to download: `cvolution_jax.data.shapes` writes 1000 train / 200 held-out
128x128 images into `<workdir>/shapes` on first use; each object's visible mask is painted with
its class (background 0, rectangle 1, ellipse 2, triangle 3). The model is the Cityscapes one
scaled down: a ResNet with one bottleneck per stage (widths 16/32/64/128) trained from scratch,
FPN of 64 channels with C-volution (K=7) output ops, an FPNHead of 64 channels; mmseg's
pipeline with the 128x128 image as its scale (128x128 crops, cat_max_ratio 0.75, flip) with a
narrower rescale range (0.75-1.5: at 0.5 the smallest shapes shrink to 6 pixels) and no
photometric distortion (the shapes' colours are random already and say nothing about the class),
and mmseg's poly SGD at a higher rate (0.1) for the short run.

Measured 2026-12-01 (jax 0.10.2, 2 CPU cores, nearly idle): mIoU 39.99 (aAcc 88.03, mAcc 49.99)
on the 200 held-out images, 7 min 4 s for the whole command from an empty workdir, dataset
writing and `--vis 4` included (docs/segmentation.md). 1000 steps gave mIoU 31.17 in
3 min 0 s: the shape classes were still being learned.
"""

from experiments.configs import common


def get_config():
    config = common.segmentation("resnet50", decode_head="fpn", neck_op="cvolution")
    config.model.backbone_overrides = {"stage_sizes": (1, 1, 1, 1), "widths": (16, 32, 64, 128), "stem_width": 32}
    config.model.channels = 64
    config.model.head_channels = 64
    config.data.name = "shapes"
    config.data.scale = (128, 128)
    config.data.crop_size = (128, 128)
    config.data.ratio_range = (0.75, 1.5)
    config.data.photometric = False
    config.data.num_workers = 0
    config.data.num_threads = 2
    config.batch_size = 8
    config.num_train_steps = 2500
    config.base_lr = 0.1
    config.eval_every_steps = 2500  # once, at the end
    config.checkpoint_every_steps = 500
    config.log_every_steps = 20
    config.expected_miou = -1.0
    return config
