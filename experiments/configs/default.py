"""The embedded default: a small CedNet on scikit-learn's digits, on CPU in a few minutes.

    python -m experiments.imagenet --config experiments/configs/default.py --workdir runs/default

Real data with nothing to download: the 1797 8x8 UCI digits (a fixed stratified 1437/360 split)
resized to 32x32. The model is CedNet with C-volution ops (dilated-3x3 context, static channel
branch; K=3 in the stem, K=7 in three single-block stages of widths 16/32/64), behind the "small"
stem (one stride-2 conv, no max pool). Expected: 99.72% test top-1 (359/360) after 15 epochs,
about 1.5 min on 2 CPU cores (measured 2026-12-07; 98.89% on 2026-12-02, docs/ablation.md).
"""

from experiments.configs import common


def get_config():
    config = common.base_config()
    config.model.name = "cednet26"
    config.model.overrides = {"stem": "small", "stem_width": 32, "widths": (16, 32, 64), "stage_sizes": (1, 1, 1)}
    config.data.name = "digits"
    config.data.image_size = 32
    config.batch_size = 64
    config.num_epochs = 15.0
    config.base_lr = 0.4  # per 256 images: lr 0.1 at batch 64
    config.warmup_epochs = 1.0
    config.weight_decay = 5e-4
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    return config
