"""Parameter and MAC counts of the registered models.

    python -m cvolution_jax.count [NAME ...] [--image-size 224] [--num-classes 1000] [--json]

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

from cvolution_jax import layers, models


def _macs(module: nn.Module, args, output) -> int:
    if isinstance(module, nn.Conv):
        kernel = module.variables["params"]["kernel"]
        return math.prod(output.shape[1:]) * math.prod(kernel.shape[:-1])
    if isinstance(module, nn.Dense):
        return math.prod(output.shape[1:]) * args[0].shape[-1]
    if isinstance(module, (layers.Involution, layers.CVolution)):
        return math.prod(output.shape[1:]) * module.kernel_size**2
    return 0


def count(model: nn.Module, image_size: int = 224) -> dict:
    """`{"params": int, "macs": int}` of `model` on one `[1, image_size, image_size, 3]` image."""
    macs = []

    def interceptor(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            macs.append(_macs(context.module, args, output))
        return output

    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    return {"params": int(params), "macs": int(sum(macs))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvolution_jax.count", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models to count (default: all): {', '.join(models.names())}")
    parser.add_argument("--image-size", type=int, default=224, help="square input size (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--json", action="store_true", help='print a JSON list of {"model", "params", "macs"}')
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in models.names()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid names: {', '.join(models.names())}")
    rows = [{"model": name, **count(models.create(name, num_classes=args.num_classes), args.image_size)} for name in args.names or models.names()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'model':<10} {'params (M)':>10} {'MACs (G)':>9}   at {args.image_size}x{args.image_size}, {args.num_classes} classes")
    for row in rows:
        print(f"{row['model']:<10} {row['params'] / 1e6:>10.2f} {row['macs'] / 1e9:>9.2f}")


if __name__ == "__main__":
    main()
