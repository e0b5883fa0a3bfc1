"""Shared pieces of the configs: every field the training loop reads, and the ImageNet recipe."""

import ml_collections

from cvolution_jax import data

# Top-1 (%) after the recipe below, as published: the C-volution paper's model zoo (RedNet-38/50, CedNet-38/50)
# and involution's (RedNet-26/101/152); ResNet-50 is the paper's CedNet-50 minus its stated +2.0.
PUBLISHED_TOP1 = {
    "resnet50": 76.8,
    "rednet26": 75.96, "rednet38": 77.48, "rednet50": 78.35, "rednet101": 78.92, "rednet152": 79.12,
    "cednet38": 78.0, "cednet50": 78.83,
}


def base_config() -> ml_collections.ConfigDict:
    """Every field `cvolution_jax.train.loop` reads, with the ImageNet recipe's values."""
    config = ml_collections.ConfigDict()
    config.task = "classification"  # cvolution_jax.tasks.TASKS: what trains it, and how every tool reads its runs
    config.mode = "train"  # "train" (resumes from the latest checkpoint) or "eval"
    config.checkpoint_step = -1  # eval mode: the step to restore; -1 for the latest
    config.model = ml_collections.ConfigDict({"name": "cednet50", "overrides": {}})
    config.data = data.default_config()
    config.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
    config.seed = 0
    config.batch_size = 2048  # global, over all devices and processes
    config.num_epochs = 130.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.base_lr = 0.1  # per 256 images
    config.warmup_epochs = 5.0  # 3130 steps at batch 2048
    config.warmup_factor = 0.25  # warm-up starts at this fraction of the peak lr
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 1e-4  # kernels only; BatchNorm and biases are not decayed
    config.static_kernel_lr_mult = 1.0  # C-volution's static kernels S train at this x the lr
    config.label_smoothing = 0.1
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1: once per epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the latest ones; the best by eval top-1 is kept too
    return config


def imagenet(model: str) -> ml_collections.ConfigDict:
    """ImageNet-1k with the involution recipe for registry model `model`."""
    config = base_config()
    config.model.name = model
    config.data.name = "imagenet"
    config.data.image_size = 224
    config.data.num_workers = 16
    config.expected_top1 = PUBLISHED_TOP1.get(model, -1.0)  # -1: no published number
    return config


# Box AP (COCO val2017, %) of the paper's Faster R-CNN 1x table and mmdetection's ResNet-50 baseline.
PUBLISHED_BOX_AP = {"resnet50": 37.4, "rednet50": 39.5, "rednet50_neck": 40.2, "cednet50": 40.5}
# (box AP, mask AP) of the paper's Mask R-CNN 1x table and mmdetection's ResNet-50 baseline.
PUBLISHED_MASK_RCNN_AP = {"resnet50": (38.2, 34.7), "rednet50": (39.9, 35.7), "rednet50_neck": (40.8, 36.4),
                          "cednet50": (41.0, 36.7)}


# The data fields of the datasets written on first use, shared by detection and segmentation.
EMBEDDED_DATA = {
    # shapes only
    "num_train": 1000,
    "num_val": 200,
    "image_size": 128,
    "shapes_seed": 0,
    # nuclei only
    "wheel": "",  # a local stardist-0.9.2 wheel; empty: pip downloads it
}


def detection(backbone: str, neck_op: str = "conv", detector: str = "faster_rcnn",
              head_op: str = "conv") -> ml_collections.ConfigDict:
    """Every field `cvolution_jax.tasks.detection` reads, with mmdet's Faster R-CNN (or Mask R-CNN)
    FPN 1x recipe on COCO 2017 for registry backbone `backbone`, FPN output op `neck_op` and the
    op of the RPN's shared layer and the mask head's 4 layers `head_op` (the paper's "head" variants)."""
    config = ml_collections.ConfigDict()
    config.task = "detection"  # cvolution_jax.tasks.TASKS: what trains it, and how every tool reads its runs
    config.mode = "train"  # "train" (resumes from the latest checkpoint) or "eval"
    config.checkpoint_step = -1  # eval mode: the step to restore; -1 for the latest
    config.model = ml_collections.ConfigDict({
        "detector": detector,  # "faster_rcnn" or "mask_rcnn"
        "backbone": backbone,  # any registry name (cvolution_jax.models.names())
        "backbone_overrides": {},  # ResNet fields, e.g. a smaller network for the CPU default
        "pretrained": "",  # workdir of an experiments.imagenet run whose latest checkpoint initialises the backbone
        "frozen_stages": 1,  # stem and stage 1 frozen (mmdet); -1 freezes nothing
        "norm_eval": True,  # backbone BatchNorm in inference mode (mmdet); False to train from scratch
        "neck_op": neck_op,  # FPN output op: "conv" (3x3), "involution" or "cvolution" (K=7)
        "rpn_op": head_op,  # the RPN's shared layer: "conv" or an op (the paper's "head" variants)
        "mask_op": head_op,  # mask_rcnn: the mask head's layers, "conv" (3x3) or an op (K=7)
        "mask_convs": 4,  # mask_rcnn: number of those layers
        "mask_channels": 256,  # mask_rcnn: their width (an op keeps the FPN's channels)
        "op_kwargs": {},  # spatial_op switches of neck/head ops, e.g. {"impl": "xla"}
        "channels": 256,  # FPN and RPN channels
        "fc_dim": 1024,  # box head FC width
        "settings": {},  # cvolution_jax.detection.faster_rcnn.Settings fields to override
    })
    config.data = ml_collections.ConfigDict({
        "name": "coco",  # "coco" (COCO 2017 layout), "shapes" (synthetic) or "nuclei" (real sample); both written on first use
        "data_dir": "",  # coco: the folder holding annotations/ train2017/ val2017/; shapes, nuclei: where to write it
        "train_annotations": "",  # coco: overrides <data_dir>/annotations/instances_train2017.json
        "train_images": "",
        "val_annotations": "",
        "val_images": "",
        "scale": (1333, 800),  # resize keeping aspect ratio: long side <= 1333, short side <= 800
        "buckets": ((800, 1344), (1344, 800)),  # padded (H, W) shapes; a batch holds one bucket
        "max_gt": 100,  # ground-truth slots per image
        "mask_size": 56 if detector == "mask_rcnn" else 0,  # mask_rcnn: each object's mask cropped to its box, M x M
        "flip_prob": 0.5,
        "num_workers": 8,
        "num_threads": 4,
        **EMBEDDED_DATA,
    })
    config.dtype = "float32"
    config.seed = 0
    config.batch_size = 16  # global
    config.num_epochs = 12.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.base_lr = 0.02  # per 16 images
    config.warmup_steps = 500
    config.warmup_factor = 0.001
    config.lr_decay_epochs = (8, 11)  # x0.1 at each
    config.momentum = 0.9
    config.weight_decay = 1e-4  # every parameter, as mmdet
    config.grad_clip_norm = 0.0  # > 0: clip the gradients' global norm (mmdet's optimizer_config.grad_clip)
    config.log_every_steps = 50
    config.eval_every_steps = -1  # -1: once per epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the latest ones; the best by eval AP is kept too
    config.eval_max_dets = (1, 10, 100)  # COCOeval's maxDets; raise the last for crowded images
    key = backbone + ("_neck" if neck_op == "involution" else "")
    if detector == "mask_rcnn":
        published = PUBLISHED_MASK_RCNN_AP.get(key, (-1.0, -1.0)) if head_op == "conv" else (-1.0, -1.0)
        config.expected_box_ap, config.expected_mask_ap = published
    else:
        config.expected_box_ap = PUBLISHED_BOX_AP.get(key, -1.0) if head_op == "conv" else -1.0
    return config


# Cityscapes val mIoU (%) at 512x1024 crops, 80k iterations, as the involution code publishes; the
# C-volution paper gives no CedNet-50 number, so those configs expect -1.
PUBLISHED_MIOU = {("fpn", "rednet50", "conv"): 78.0, ("fpn", "rednet50", "involution"): 79.1,
                  ("uper", "rednet50", "conv"): 80.6}


def segmentation(backbone: str, decode_head: str = "fpn", neck_op: str = "conv") -> ml_collections.ConfigDict:
    """Every field `cvolution_jax.tasks.segmentation` reads, with mmseg's Cityscapes 512x1024 80k
    recipe for registry backbone `backbone`: Semantic FPN (`decode_head="fpn"`, FPN output op
    `neck_op`) or UPerNet (`"uper"`, with the auxiliary FCN head on C4)."""
    uper = decode_head == "uper"
    config = ml_collections.ConfigDict()
    config.task = "segmentation"  # cvolution_jax.tasks.TASKS: what trains it, and how every tool reads its runs
    config.mode = "train"  # "train" (resumes from the latest checkpoint) or "eval"
    config.checkpoint_step = -1  # eval mode: the step to restore; -1 for the latest
    config.model = ml_collections.ConfigDict({
        "decode_head": decode_head,  # "fpn" (Semantic FPN) or "uper" (UPerNet)
        "backbone": backbone,  # any registry name; its BatchNorm trains (mmseg's norm_eval=False)
        "backbone_overrides": {},  # ResNet fields, e.g. a smaller network for the CPU default
        "pretrained": "",  # workdir of an experiments.imagenet run whose latest checkpoint initialises the backbone
        "neck_op": neck_op,  # fpn: the FPN's output op, "conv" (3x3), "involution" or "cvolution" (K=7)
        "op_kwargs": {},  # spatial_op switches of the neck's ops, e.g. {"impl": "xla"}
        "channels": 256,  # fpn: FPN channels
        "head_channels": 512 if uper else 128,  # FPNHead 128, UPerHead 512
        "pool_scales": (1, 2, 3, 6),  # uper: the pyramid pooling bins
        "dropout": 0.1,  # Dropout2d before each classifier
        "aux_weight": 0.4 if uper else 0.0,  # > 0: auxiliary FCNHead on C4 with this loss weight
        "aux_channels": 256,
    })
    config.data = ml_collections.ConfigDict({
        "name": "cityscapes",  # "cityscapes" (your download), "shapes" (synthetic) or "nuclei" (real sample)
        "data_dir": "",  # cityscapes: the folder holding leftImg8bit/ and gtFine/; shapes, nuclei: where to write
        "scale": (2048, 1024),  # (long, short): train rescale base and whole-image test size
        "ratio_range": (0.5, 2.0),  # train: scale x U(ratio_range)
        "crop_size": (512, 1024),  # (H, W) of the training crops
        "cat_max_ratio": 0.75,  # redraw a crop while one class holds this share of it
        "flip_prob": 0.5,
        "photometric": True,  # mmseg's PhotoMetricDistortion
        "num_workers": 8,
        "num_threads": 4,
        **EMBEDDED_DATA,
    })
    config.dtype = "float32"
    config.seed = 0
    config.batch_size = 8  # global (mmseg: 4 GPUs x 2)
    config.num_epochs = 0.0
    config.num_train_steps = 80000  # > 0 overrides num_epochs
    config.base_lr = 0.01  # not scaled with the batch, as mmseg
    config.min_lr = 1e-4
    config.lr_power = 0.9  # poly decay
    config.momentum = 0.9
    config.weight_decay = 5e-4  # every parameter, as mmseg
    config.log_every_steps = 50
    config.eval_every_steps = 8000
    config.checkpoint_every_steps = 8000
    config.keep_checkpoints = 3  # the latest ones; the best by eval mIoU is kept too
    config.expected_miou = PUBLISHED_MIOU.get((decode_head, backbone, neck_op), -1.0)
    return config


def study_run(study: ml_collections.ConfigDict, row: str, seed: int) -> ml_collections.ConfigDict:
    """The config of one run of a study (`experiments.ablation`): `study.recipe` with the model of
    row `row` (`study.models[row]`) and `seed`."""
    if row not in study.models:
        raise ValueError(f"Unknown ablation row {row!r}; the rows are {', '.join(study.models)}.")
    config = study.recipe.copy_and_resolve_references()
    config.model = study.models[row].copy_and_resolve_references()
    config.seed = seed
    return config
