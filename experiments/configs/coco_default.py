"""The embedded detection default: a small Mask R-CNN with a C-volution FPN neck on synthetic shapes, on CPU.

    python -m experiments.coco --config experiments/configs/coco_default.py --workdir runs/coco_default --vis 8

Data with nothing to download: `cvolution_jax.data.shapes` writes 1000 train / 200 held-out
128x128 images of rectangles, ellipses and triangles (COCO format, with instance masks) into
`<workdir>/shapes` on first use. The detector is the COCO one scaled down: a ResNet with one
bottleneck per stage (widths 16/32/64/128) trained from scratch (BatchNorm in training mode,
nothing frozen), FPN of 64 channels with C-volution (K=7) output ops, anchors of 4x the stride,
fewer proposals and RoIs, a 256-wide box head, and a mask head of 4 convolutions 32 wide on 7x7
RoIAlign features (14x14 masks) trained on 8 positive RoIs per image.

Measured 2026-12-01 (jax 0.10.2, an idle 2-core CPU machine): bbox AP 0.556 (AP50 0.828), segm AP
0.622 (AP50 0.839) on the 200 held-out images in 7 min 9 s for the whole command (median of two
runs from an empty workdir, dataset writing and `--vis 8` included; docs/detection.md, with where the time goes).
"""

from experiments.configs import common


def get_config():
    config = common.detection("resnet50", neck_op="cvolution", detector="mask_rcnn")
    config.model.backbone_overrides = {"stage_sizes": (1, 1, 1, 1), "widths": (16, 32, 64, 128), "stem_width": 32}
    config.model.frozen_stages = -1
    config.model.norm_eval = False
    config.model.channels = 64
    config.model.fc_dim = 256
    config.model.mask_channels = 32
    config.model.settings = {
        "anchor_scale": 4.0,
        "train_nms_pre": 200, "train_proposals": 128, "rcnn_samples": 64,
        "test_nms_pre": 500, "test_proposals": 300, "detections_nms_pre": 300,
        "mask_roi_size": 7,  # 14x14 masks
        "mask_rois": 8,  # per image, of the 16 positive slots
    }
    config.data.name = "shapes"
    config.data.scale = (128, 128)
    config.data.buckets = ((128, 128),)
    config.data.max_gt = 8
    config.data.mask_size = 56
    config.data.num_workers = 0
    config.data.num_threads = 2
    config.batch_size = 8
    config.num_epochs = 10.0
    config.base_lr = 0.1  # per 16 images: 0.05 at batch 8
    config.grad_clip_norm = 10.0
    config.warmup_steps = 100
    config.lr_decay_epochs = (8, 9.5)
    config.eval_every_steps = 1250  # once, at the end (10 epochs of 125 steps)
    config.log_every_steps = 20
    config.checkpoint_every_steps = 500
    config.expected_box_ap = -1.0
    config.expected_mask_ap = -1.0
    return config
