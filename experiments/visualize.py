"""Heat maps of a trained model's dynamic kernels over an image, as in the involution paper's figure.

    python -m experiments.visualize --checkpoint runs/default --image digit.png
    python -m experiments.visualize --checkpoint runs/cednet50 --image cat.jpg --layer layer3_5/conv2 --groups 16
    python -m experiments.visualize --checkpoint runs/cednet50 --image cat.jpg --pixel 120,96 --out cat_kernels.png
    python -m experiments.visualize --checkpoint runs/coco_default --image street.jpg --layer neck/output0
    python -m experiments.visualize --checkpoint runs/cednet50 --list_layers

`--checkpoint` is the workdir of an `experiments.imagenet`, `experiments.coco` or `experiments.cityscapes` run (or its
`checkpoints` folder); the image goes through that run's evaluation preprocessing. Each heat map is
one group's K x K kernel summed over its taps at every pixel (`cvolution_jax.kernel_maps`).
The default layer is the last involution / C-volution of stage 2, else the model's first one;
`--list_layers` prints them all. The PNG goes to
`<workdir>/kernels_<image stem>_<layer, '/' as '_'>.png` unless `--out` says otherwise.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from PIL import Image

from cvolution_jax import kernel_maps
from kernels import common

flags.DEFINE_string("checkpoint", None, "Workdir of an experiments.imagenet, experiments.coco or experiments.cityscapes run (or its checkpoints folder).")
flags.DEFINE_integer("step", None, "Checkpoint step to restore (default: the latest).")
flags.DEFINE_string("image", None, "Any image file PIL reads (converted to RGB, or grey for grey datasets).")
flags.DEFINE_string("layer", None, "'/'-joined path of the layer, e.g. layer2_0/conv2 or neck/output0 (default: last op of stage 2).")
flags.DEFINE_integer("groups", 8, "Draw the heat maps of this many groups (the first ones).")
flags.DEFINE_string("pixel", None, "'y,x' in model-input pixels: mark it and inset the K x K kernel there.")
flags.DEFINE_string("out", None, "PNG path (default: <workdir>/kernels_<image stem>_<layer>.png).")
flags.DEFINE_bool("list_layers", False, "Print the model's involution / C-volution layers and exit.")
flags.mark_flag_as_required("checkpoint")
FLAGS = flags.FLAGS


def parse_pixel(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--pixel must be 'y,x' (two integers, model-input pixels), e.g. --pixel 12,20; got {text!r}.") from None
    return y, x


def visualize(checkpoint: str, image: str, *, layer: str | None = None, step: int | None = None, groups: int = 8,
              pixel: tuple[int, int] | None = None, out: str | None = None) -> str:
    """Draws the kernel heat maps of `layer` of the run at `checkpoint` over `image`; returns the PNG's path."""
    if out is not None:
        if os.path.isdir(out):
            raise ValueError(f"--out {out} is a directory; give the PNG's path, e.g. --out {os.path.join(out, 'kernels.png')}.")
        if not out.lower().endswith(".png"):
            raise ValueError(f"--out {out}: the picture is a PNG; give a path ending in .png (an existing file of another "
                             f"kind is never replaced).")
        problem = common.output_problem(out, folder=False)
        if problem:
            raise ValueError(f"--out {out}: {problem}.")
    run = kernel_maps.load_run(checkpoint, step)
    layers = kernel_maps.spatial_op_layers(run.variables)
    layer = layer or kernel_maps.default_layer(layers)
    if not os.path.isfile(image):
        raise FileNotFoundError(f"--image {image} is not a file; give the path of an image PIL can read (PNG, JPEG...).")
    try:
        with Image.open(image) as picture:
            picture.load()
    except OSError as error:
        raise ValueError(f"--image {image} could not be read as an image ({error}); give a PNG, JPEG or other file PIL reads.") from None
    inputs, display = kernel_maps.preprocess(run.config, picture)
    kernels = kernel_maps.dynamic_kernels(run.model, run.variables, inputs, layer, **run.apply_kwargs)
    stem = os.path.splitext(os.path.basename(image))[0]
    out = out or os.path.join(run.workdir, f"kernels_{stem}_{layer.replace('/', '_')}.png")
    kernel_maps.render(display, kernels[0], out, groups=groups, pixel=pixel, title=f"{layer}, step {run.step}")
    _, height, width, num_groups, taps = kernels.shape
    print(f"{run.task} run {run.workdir}, step {run.step}: layer {layer} generates {taps} taps per kernel, "
          f"{num_groups} group(s), on a {height}x{width} grid; drew {min(groups, num_groups)} to {out}")
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it reads at INFO
    try:
        if FLAGS.list_layers:
            run = kernel_maps.load_run(FLAGS.checkpoint, FLAGS.step)
            layers = kernel_maps.spatial_op_layers(run.variables)
            default = kernel_maps.default_layer(layers) if layers else None
            print("\n".join(f"{layer}{'  (default)' if layer == default else ''}" for layer in layers) or "no involution or C-volution layers")
            return
        if FLAGS.image is None:
            raise ValueError("--image is required (the picture to draw the kernels over), unless --list_layers.")
        visualize(FLAGS.checkpoint, FLAGS.image, layer=FLAGS.layer, step=FLAGS.step, groups=FLAGS.groups,
                  pixel=parse_pixel(FLAGS.pixel), out=FLAGS.out)
    except (FileNotFoundError, ValueError) as error:  # CheckpointMismatchError is a ValueError
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
