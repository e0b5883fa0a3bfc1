"""Mask R-CNN, CedNet-50-FPN with C-volution (K=7) FPN output ops, RPN layer and mask-head layers (the "head" variant), COCO 2017, mmdetection's 1x schedule.

    python -m experiments.coco --config experiments/configs/mask_rcnn_cednet50_fpn_head_1x.py --workdir runs/mask_rcnn_cednet50_head \
        --config.data.data_dir=/path/to/coco --config.model.pretrained=runs/cednet50

`pretrained` is the workdir of a finished `experiments.imagenet` run of cednet50. SGD lr 0.02 at
batch 16, momentum 0.9, weight decay 1e-4, linear warm-up over 500 steps from 0.001x, x0.1 after
epochs 8 and 11 of 12; images resized to 1333x800 keeping aspect ratio, flip 0.5. Mask head:
RoIAlign 14x14, 4 layers, 28x28 masks, binarised at 0.5 after pasting; COCOeval bbox and segm.

Expected (box AP, mask AP): none published in the C-volution paper. Not reproduced by this project yet.
"""

from experiments.configs import common


def get_config():
    return common.detection("cednet50", neck_op="cvolution", detector="mask_rcnn", head_op="cvolution")
