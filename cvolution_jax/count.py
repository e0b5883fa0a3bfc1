"""Parameter and MAC counts of the registered models and of the model a run's config trains.

    python -m cvolution_jax.count [NAME ...] [--image-size 224] [--num-classes 1000] [--json]
    python -m cvolution_jax.count --config experiments/configs/mask_rcnn_cednet50_fpn_1x.py [--config.FIELD=VALUE ...]

A NAME is a registry model (`cvolution_jax.models.names()`, default: all of them). `--config` loads a
run's config file as the entry points do (overrides too; run from the repository root, where its
`experiments.configs` imports resolve) and counts the model that run trains, built by its task
(`config.task`, `cvolution_jax.tasks.get(config).create_model`) at the size of the task's
published counts (`COUNTS`):
- classification: 1000 classes, 224x224;
- semantic segmentation:
  Cityscapes' 19 classes on one 1024x2048 image, mmsegmentation's `get_flops` input; MACs of the
  test-time network (no auxiliary head), parameters of all of it (the auxiliary head's included),
  as mmseg's `get_flops` reports them;
- detection: 80 classes, one
  800x1280 image, mmdetection's `get_flops` size. The whole test-time network is counted, box head
  on its 1000 proposals included (and the mask head on the 100 detections); RoIAlign and NMS are
  not. (mmdetection's `get_flops` runs `forward_dummy`, whose mask head sees the first 100
  proposals: the same count.)
`--image-size` (square) and `--num-classes` replace those sizes.

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
import dataclasses
import json
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from cvolution_jax import layers, models, tasks
from cvolution_jax.train import cli
from cvolution_jax.segmentation.encoder_decoder import init_variables


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


def detector_inputs(image: jax.Array) -> dict:
    """The batch a detector takes for one unpadded `[1, H, W, 3]` image."""
    return {"image": image, "image_size": jnp.asarray([image.shape[1:3]], jnp.int32)}


@dataclasses.dataclass(frozen=True)
class TaskCount:
    """How `count` measures the model of one task's run config (the model itself is the task's,
    `cvolution_jax.tasks.get(config).create_model`, as its runs build it).

    Attributes:
      num_classes: the classes of the task's published counts.
      image_size: `(H, W)` of one image of those counts.
      inputs: one `[1, H, W, 3]` image -> the input the model's `init` takes.
      all_params: `(model, (H, W, 3)) -> params` for a model whose `init` leaves out parameters
        used only in training (a segmentor's auxiliary head); None: those of `init`.
    """

    num_classes: int
    image_size: tuple[int, int]
    inputs: Callable[[jax.Array], Any] = lambda image: image
    all_params: Callable[[nn.Module, tuple[int, int, int]], Any] | None = None


# config.task -> how that task's models are counted: the published counts' classes and input size.
COUNTS = {
    "classification": TaskCount(1000, (224, 224)),
    "detection": TaskCount(80, (800, 1280), detector_inputs),
    "segmentation": TaskCount(19, (1024, 2048),
                              all_params=lambda model, shape: init_variables(model, jax.random.key(0), shape)["params"]),
}


def task_count(config: ml_collections.ConfigDict) -> TaskCount:
    """The `COUNTS` entry of `config`'s task; ValueError if it is not the config of a training run."""
    return COUNTS[tasks.name_of(config)]


def load_config(path: str, overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The config of file `path` (its `get_config()`) with `--config.FIELD=VALUE` `overrides`
    applied, parsed as the training entry points parse them (`ml_collections.config_flags`)."""
    if not os.path.isfile(path.split(":", 1)[0]):  # `file.py:arg` passes `arg` to get_config
        raise FileNotFoundError(f"--config {path}: no such file; give a config file, e.g. experiments/configs/cednet50.py.")
    argv = ["count", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "A run's config file.", flag_values=flag_values, sys_argv=argv,
                                    lock_config=True)
    problem = cli.config_file_problem(path, flag_values["config"].parser)
    if problem:
        raise ValueError(problem)
    flag_values(argv)
    return flag_values.config


def count(model: nn.Module, image_size: int | tuple[int, int] = 224, inputs: Callable[[jax.Array], Any] | None = None) -> dict:
    """`{"params": int, "macs": int}` of `model` on one `[1, H, W, 3]` image (`image_size` is H = W
    or `(H, W)`), handed to the model as `inputs(image)` (default: the image itself)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    image = jnp.zeros((1, height, width, 3))
    macs = []

    def interceptor(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            macs.append(_macs(context.module, args, output))
        return output

    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(model.init, jax.random.key(0), image if inputs is None else inputs(image))
    params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    return {"params": int(params), "macs": int(sum(macs))}


def count_config(config: ml_collections.ConfigDict, image_size: tuple[int, int] | None = None,
                 num_classes: int | None = None) -> dict:
    """`count` of the model `config` trains, built by its task's builder; `image_size` `(H, W)` and
    `num_classes` default to the task's (`COUNTS`). Adds the `input` and `classes` counted."""
    spec = task_count(config)
    image_size = image_size or spec.image_size
    num_classes = num_classes or spec.num_classes
    model = tasks.get(config).create_model(config, num_classes)
    counted = count(model, image_size, spec.inputs)
    if spec.all_params is not None:
        params = jax.eval_shape(lambda: spec.all_params(model, (*image_size, 3)))
        counted["params"] = int(sum(leaf.size for leaf in jax.tree.leaves(params)))
    return {**counted, "input": "x".join(map(str, image_size)), "classes": num_classes}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvolution_jax.count", description=__doc__.split("\n\n")[0])
    valid = models.names()
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"registry models to count (default: all, unless --config): {', '.join(valid)}")
    parser.add_argument("--config", metavar="FILE", help="a run's config file: counts the model it trains; "
                        "--config.FIELD=VALUE overrides a field of it, as in training")
    parser.add_argument("--image-size", type=int, help="square input size (default: 224; a config's task's size)")
    parser.add_argument("--num-classes", type=int, help="classifier outputs (default: 1000; a config's task's)")
    parser.add_argument("--json", action="store_true", help='print a JSON list of {"model", "params", "macs", "input", "classes"}')
    args, extra = parser.parse_known_args(argv)
    overrides = tuple(arg for arg in extra if arg.startswith("--config."))
    if len(overrides) < len(extra):
        parser.error(f"unrecognized arguments: {' '.join(arg for arg in extra if arg not in overrides)}")
    if overrides and args.config is None:
        parser.error(f"{overrides[0]} overrides a field of a config: give the file too, --config FILE.")
    bare = [arg for arg in overrides if "=" not in arg]
    if bare:
        parser.error(f"{bare[0]} has no value: write the override as {bare[0]}=VALUE.")
    for flag, value in (("--image-size", args.image_size), ("--num-classes", args.num_classes)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1; got {value}.")
    unknown = [name for name in args.names if name not in valid]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid names: {', '.join(valid)}")
    image_size, num_classes = args.image_size or 224, args.num_classes or 1000
    rows = [{"model": name, **count(models.create(name, num_classes=num_classes), image_size),
             "input": f"{image_size}x{image_size}", "classes": num_classes}
            for name in args.names or ([] if args.config else valid)]
    if args.config:
        try:
            config = load_config(args.config, overrides)
        except (FileNotFoundError, ValueError) as error:  # no such file, or one that is no config file
            parser.error(str(error))
        except (AttributeError, KeyError) as error:  # ml_collections: an override of a field the file lacks
            cause = error.args[0] if error.args else error
            detail = (cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)).replace("\n", " ")
            parser.error(f"{' '.join(overrides)}: {args.config} has no such field ({detail}). Fix the spelling.")
        except flags.Error as error:  # a value of the wrong type
            parser.error(f"{args.config}: {error}")
        square = (args.image_size, args.image_size) if args.image_size else None
        try:
            counted = count_config(config, square, args.num_classes)
        except ValueError as error:
            parser.error(f"{args.config}: {error}")
        rows.append({"model": " ".join([os.path.splitext(os.path.basename(args.config))[0], *overrides]), **counted})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    width = max([30] + [len(row["model"]) for row in rows])
    print(f"{'model':<{width}} {'params (M)':>10} {'MACs (G)':>9}  input     classes")
    for row in rows:
        print(f"{row['model']:<{width}} {row['params'] / 1e6:>10.2f} {row['macs'] / 1e9:>9.2f}  {row['input']:<9} {row['classes']}")


if __name__ == "__main__":
    main()
