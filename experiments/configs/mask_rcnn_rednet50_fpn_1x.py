"""Mask R-CNN, RedNet-50-FPN, COCO 2017, mmdetection's 1x schedule.

    python -m experiments.coco --config experiments/configs/mask_rcnn_rednet50_fpn_1x.py --workdir runs/mask_rcnn_rednet50 \
        --config.data.data_dir=/path/to/coco --config.model.pretrained=runs/rednet50

`pretrained` is the workdir of a finished `experiments.imagenet` run of rednet50. SGD lr 0.02 at
batch 16, momentum 0.9, weight decay 1e-4, linear warm-up over 500 steps from 0.001x, x0.1 after
epochs 8 and 11 of 12; images resized to 1333x800 keeping aspect ratio, flip 0.5. Mask head:
RoIAlign 14x14, 4 layers, 28x28 masks, binarised at 0.5 after pasting; COCOeval bbox and segm.

Expected (box AP, mask AP): (39.9, 35.7) (the C-volution paper); 34.2M in the paper. Not reproduced by this project yet.
"""

from experiments.configs import common


def get_config():
    return common.detection("rednet50", detector="mask_rcnn")
