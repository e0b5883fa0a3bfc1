"""CedNet-38 on ImageNet-1k with the involution recipe.

    python -m experiments.imagenet --config experiments/configs/cednet38.py --workdir runs/cednet38 --config.data.data_dir=/path/to/imagenet

SGD Nesterov 0.9, lr 0.8 at batch 2048 (0.1 per 256), 5 warm-up epochs from 0.25x then cosine to 0
over 130 epochs, weight decay 1e-4 (not on BatchNorm and biases), label smoothing 0.1;
RandomResizedCrop 224 + flip, eval resize 256 + center crop 224.

Expected top-1: 78.0 (the C-volution paper's model zoo). Not reproduced by this project yet.
"""

from experiments.configs import common


def get_config():
    return common.imagenet("cednet38")
