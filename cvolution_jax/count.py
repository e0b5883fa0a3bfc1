"""Parameter and MAC counts of the registered models and of the detectors.

    python -m cvolution_jax.count [NAME ...] [--image-size 224] [--num-classes 1000] [--json]

Detectors (`faster_rcnn_*`, `mask_rcnn_*`, see `DETECTORS`) are counted with 80 classes on one
800x1280 image: the whole test-time network, box head on its 1000 proposals included (and the
mask head on the 100 detections); RoIAlign and NMS are not counted. (mmdetection's `get_flops`
runs `forward_dummy`, whose mask head sees the first 100 proposals: the same count.)

Parameters are the sizes of the leaves of the model's real `params` collection (BatchNorm
running statistics excluded), obtained by tracing `model.init` abstractly: the same variables
`init` creates, without computing them.

MACs (multiply-accumulates) for one image, the convention of the involution and mmcv counters:
- convolution: `Ho * Wo * Cout * K_h * K_w * Cin / groups` (kernel generation included);
- dense: `in_features * out_features`;
- aggregation of involution and C-volution: `Ho * Wo * C * K * K` (one multiply-add per tap;
  adding the static kernel to the dynamic one is not counted);
- BatchNorm, activations, pooling, residual adds and biases are not counted.
They are recorded by intercepting every layer call while `init` is traced.
"""

from __future__ import annotations

import argparse
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cvolution_jax import layers, models
from cvolution_jax.detection.faster_rcnn import FasterRCNN
from cvolution_jax.tasks import detection


def _macs(module: nn.Module, args, output) -> int:
    # `count` runs one image, so every leading axis of an output counts: the mask head folds its
    # RoIs into the batch axis of its convolutions.
    if isinstance(module, nn.Conv):
        kernel = module.variables["params"]["kernel"]
        return math.prod(output.shape[:-1]) * math.prod(kernel.shape)
    if isinstance(module, nn.ConvTranspose):  # every input pixel meets every kernel tap once
        kernel = module.variables["params"]["kernel"]
        return math.prod(args[0].shape[:-1]) * math.prod(kernel.shape)
    if isinstance(module, nn.Dense):
        return math.prod(output.shape) * args[0].shape[-1]
    if isinstance(module, (layers.Involution, layers.CVolution)):
        return math.prod(output.shape) * module.kernel_size**2
    return 0


# detector -> (registry backbone, FPN output op, RPN / mask-head op): the paper's Faster and Mask
# R-CNN tables, their "head" variants and mmdet's baselines.
DETECTORS = {
    "faster_rcnn_resnet50_fpn": ("resnet50", "conv", "conv"),
    "faster_rcnn_rednet50_fpn": ("rednet50", "conv", "conv"),
    "faster_rcnn_rednet50_neck_fpn": ("rednet50", "involution", "conv"),
    "faster_rcnn_cednet50_fpn": ("cednet50", "cvolution", "conv"),
    # RedNet-50 backbone with a C-volution neck: the design whose count is the paper's CedNet-50 row.
    "faster_rcnn_rednet50_cvolution_neck_fpn": ("rednet50", "cvolution", "conv"),
    "mask_rcnn_resnet50_fpn": ("resnet50", "conv", "conv"),
    "mask_rcnn_rednet50_fpn": ("rednet50", "conv", "conv"),
    "mask_rcnn_rednet50_neck_fpn": ("rednet50", "involution", "conv"),
    "mask_rcnn_rednet50_neck_fpn_head": ("rednet50", "involution", "involution"),
    "mask_rcnn_cednet50_fpn": ("cednet50", "cvolution", "conv"),
    "mask_rcnn_cednet50_fpn_head": ("cednet50", "cvolution", "cvolution"),
}
DETECTOR_IMAGE = (800, 1280)  # (H, W) of the detectors' MAC count
DETECTOR_CLASSES = 80


def create_detector(name: str, num_classes: int = DETECTOR_CLASSES) -> nn.Module:
    """The Faster or Mask R-CNN `name` of `DETECTORS` with mmdet's settings, built as a training
    run builds it (`cvolution_jax.tasks.detection.create_detector`)."""
    backbone, neck_op, head_op = DETECTORS[name]
    model = {"detector": name[: name.index("_rcnn")] + "_rcnn", "backbone": backbone, "neck_op": neck_op,
             "rpn_op": head_op, "mask_op": head_op}
    return detection.create_detector(ml_collections.ConfigDict({"model": model}), num_classes)


def count(model: nn.Module, image_size: int | tuple[int, int] = 224) -> dict:
    """`{"params": int, "macs": int}` of `model` on one `[1, H, W, 3]` image (`image_size` is H = W
    or `(H, W)`); a detector gets the batch dict it takes."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    inputs = jnp.zeros((1, height, width, 3))
    if isinstance(model, FasterRCNN):
        inputs = {"image": inputs, "image_size": jnp.asarray([[height, width]], jnp.int32)}
    macs = []

    def interceptor(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            macs.append(_macs(context.module, args, output))
        return output

    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(model.init, jax.random.key(0), inputs)
    params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    return {"params": int(params), "macs": int(sum(macs))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvolution_jax.count", description=__doc__.split("\n\n")[0])
    valid = models.names() + list(DETECTORS)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models to count (default: all): {', '.join(valid)}")
    parser.add_argument("--image-size", type=int, default=224, help="square input size (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--json", action="store_true", help='print a JSON list of {"model", "params", "macs"}')
    args = parser.parse_args(argv)
    if args.image_size < 1:
        parser.error(f"--image-size must be >= 1 (pixels per side); got {args.image_size}.")
    if args.num_classes < 1:
        parser.error(f"--num-classes must be >= 1; got {args.num_classes}.")
    unknown = [name for name in args.names if name not in valid]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid names: {', '.join(valid)}")
    rows = []
    for name in args.names or valid:
        if name in DETECTORS:
            rows.append({"model": name, **count(create_detector(name), DETECTOR_IMAGE), "input": "x".join(map(str, DETECTOR_IMAGE)),
                         "classes": DETECTOR_CLASSES})
        else:
            rows.append({"model": name, **count(models.create(name, num_classes=args.num_classes), args.image_size),
                         "input": f"{args.image_size}x{args.image_size}", "classes": args.num_classes})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'model':<30} {'params (M)':>10} {'MACs (G)':>9}  input     classes")
    for row in rows:
        print(f"{row['model']:<30} {row['params'] / 1e6:>10.2f} {row['macs'] / 1e9:>9.2f}  {row['input']:<9} {row['classes']}")


if __name__ == "__main__":
    main()
