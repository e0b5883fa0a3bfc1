"""UPerNet, RedNet-50 backbone: mmseg's Cityscapes recipe (512x1024 crops, 80k iterations, batch 8).

    python -m experiments.cityscapes --config experiments/configs/upernet_rednet50_512x1024_80k_cityscapes.py \
        --workdir runs/upernet_rednet50_cityscapes --config.data.data_dir=/data/cityscapes

mmseg starts from an ImageNet backbone: pass `--config.model.pretrained=<experiments.imagenet workdir>`. Expected:
`expected_miou` (Cityscapes val, whole-image test at 2048x1024; -1 where none is published).
Not run here: it needs the Cityscapes download and GPUs.
"""

from experiments.configs import common


def get_config():
    return common.segmentation("rednet50", decode_head="uper", neck_op="conv")
