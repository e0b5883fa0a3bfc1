"""A small CedNet on Fashion-MNIST (60000/10000 real 28x28 images, Debian's dataset-fashion-mnist).

    apt-get install dataset-fashion-mnist    # files in /usr/share/datasets/fashion-mnist
    python -m experiments.imagenet --config experiments/configs/fashion_mnist.py --workdir runs/fashion_mnist

The default config's network (C-volution, K=3 in the "small" stem and K=7 in three
single-block stages of widths 16/32/64) at the native 28x28, pad-4 random crops and flips.
Expected: 90.65% test top-1 after 8 epochs, 14 min 11 s on an idle 2-core CPU machine (measured
2026-12-02, docs/ablation.md, "Results").
"""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "fashion_mnist"
    config.data.image_size = 28
    config.batch_size = 128
    config.num_epochs = 8.0
    config.base_lr = 0.4  # per 256 images: lr 0.2 at batch 128
    config.warmup_epochs = 0.5
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    return config
