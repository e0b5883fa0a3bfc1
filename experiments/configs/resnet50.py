"""ResNet-50 on ImageNet-1k with the involution recipe.

    python -m experiments.imagenet --config experiments/configs/resnet50.py --workdir runs/resnet50 --config.data.data_dir=/path/to/imagenet

SGD Nesterov 0.9, lr 0.8 at batch 2048 (0.1 per 256), 5 warm-up epochs from 0.25x then cosine to 0
over 130 epochs, weight decay 1e-4 (not on BatchNorm and biases), label smoothing 0.1;
RandomResizedCrop 224 + flip, eval resize 256 + center crop 224.

Expected top-1: about 76.8 (the paper's CedNet-50 top-1 minus its stated +2.0 over ResNet-50). Not reproduced by this project yet.
"""

from experiments.configs import common


def get_config():
    return common.imagenet("resnet50")
