"""PyTorch RedNet (involution / mmcls) weights -> an orbax checkpoint of our RedNet.

    python -m cvolution_jax.convert.torch_rednet rednet50.pth runs/rednet50_torch --model rednet50
    python -m experiments.imagenet --config experiments/configs/rednet50.py \
        --workdir runs/rednet50_torch --config.mode=eval --config.data.data_dir=/path/to/imagenet

`IN.pth` holds a state dict, raw or as mmcls saves it (`{"state_dict": ..., "meta": ...}`), with
the names of mmcls's `ImageClassifier(backbone=RedNet, neck=GlobalAveragePooling,
head=LinearClsHead)` from d-li14/involution (`cls/mmcls/models/backbones/rednet.py`). Our
module names follow it (`models/resnet.py`); the renames are:

| here (`params/...`, `batch_stats/...`) | mmcls state dict |
|---|---|
| `stem_conv1`, `stem_bn1` | `backbone.stem.0.conv`, `backbone.stem.0.bn` (ConvModule 3x3 s2) |
| `stem_op` (involution K=3) | `backbone.stem.1` |
| `stem_bn2` | `backbone.stem.2` (a bare BatchNorm2d; `stem.3` is its ReLU) |
| `stem_conv2`, `stem_bn3` | `backbone.stem.4.conv`, `backbone.stem.4.bn` (ConvModule 3x3) |
| `layer3_5/{conv1,bn1,conv2,bn2,conv3,bn3}` | `backbone.layer3.5.{...}` (conv2 is the involution) |
| `layer3_0/downsample_conv`, `downsample_bn` | `backbone.layer3.0.downsample.0`, `.downsample.1` |
| `<involution>/generator/reduce_conv`, `reduce_bn` | `<involution>.conv1.conv`, `.conv1.bn` |
| `<involution>/generator/span_conv` | `<involution>.conv2.conv` (with bias) |
| `fc` | `head.fc` |

and the leaves: `kernel` <- `weight` (conv OIHW -> HWIO, Linear `[out, in]` -> `[in, out]`),
`bias` <- `bias`, BatchNorm `scale`/`bias` <- `weight`/`bias`, `mean`/`var` <-
`running_mean`/`running_var`; `num_batches_tracked` is not used. The span conv's output channel
`g*K*K + kh*K + kw` is read by both sides the same way (the reference's
`view(b, G, K*K, h, w)`), so it is copied as is.

The mmcls stem is ours (`stem="rednet"`): conv3x3 s2 3->32 +BN+ReLU, involution(32, K=3), BN,
ReLU, conv3x3 32->64 +BN+ReLU, maxpool 3x3 s2 pad 1.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cvolution_jax import models
from cvolution_jax.models import ResNet
from cvolution_jax.tasks import classification
from cvolution_jax.train import checkpoint, steps

STEP = 0  # the converted weights are the checkpoint a run would start from
_PICKLE_PROTOCOL = b"\x80"  # pickle's PROTO opcode, the first byte of torch's legacy format (protocol >= 2)

# Our module name -> the mmcls module path it holds. Bottleneck convs/BNs keep their names.
_MODULES = {
    "stem_conv1": "stem.0.conv",
    "stem_bn1": "stem.0.bn",
    "stem_op": "stem.1",
    "stem_bn2": "stem.2",
    "stem_conv2": "stem.4.conv",
    "stem_bn3": "stem.4.bn",
    "downsample_conv": "downsample.0",
    "downsample_bn": "downsample.1",
    # The reference involution owns its two mmcv ConvModules; ours nests them in `generator`.
    "generator": None,
    "reduce_conv": "conv1.conv",
    "reduce_bn": "conv1.bn",
    "span_conv": "conv2.conv",
}
_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_BLOCK = re.compile(r"layer(\d+)_(\d+)")


class StateDictMismatchError(ValueError):
    """The state dict's keys or shapes do not fit the model it is converted into."""


def torch_key(path: tuple[str, ...]) -> str:
    """The mmcls state-dict key of our variable `path`, e.g.
    `("layer1_0", "conv2", "generator", "reduce_bn", "mean")` -> `backbone.layer1.0.conv2.conv1.bn.running_mean`."""
    *modules, leaf = path
    parts = []
    for name in modules:
        block = _BLOCK.fullmatch(name)
        renamed = f"layer{block[1]}.{block[2]}" if block else _MODULES.get(name, name)
        if renamed is not None:
            parts.append(renamed)
    return ".".join(["head" if modules[0] == "fc" else "backbone", *parts, _LEAVES.get(leaf, leaf)])


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """PyTorch's shape of an array of our `shape`: HWIO `[kh, kw, in, out]` -> OIHW, `[in, out]` -> `[out, in]`."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def from_torch_layout(value: np.ndarray) -> np.ndarray:
    """A PyTorch array in our layout: conv OIHW -> HWIO, Linear `[out, in]` -> `[in, out]`, 1-D as is."""
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def check_rednet(model: Any) -> None:
    """Raises ValueError unless `model` is a RedNet: the only layout an mmcls RedNet maps onto."""
    if not isinstance(model, ResNet) or model.op.kind != "involution" or model.stem != "rednet":
        got = f"op={model.op.kind!r}, stem={model.stem!r}" if isinstance(model, ResNet) else type(model).__name__
        raise ValueError(
            f"PyTorch RedNet weights convert only into a RedNet (op='involution', stem='rednet'); got {got}. "
            f"Use --model rednet26, rednet38, rednet50, rednet101 or rednet152."
        )


def as_numpy_state_dict(loaded: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`{key: float32 ndarray}` of a state dict or of mmcls's `{"state_dict": ..., "meta": ...}`.

    Floating tensors of any precision become float32 (our parameters are float32); integer
    buffers (`num_batches_tracked`) are kept as they are.
    """
    import torch  # the optional extra: only reading PyTorch checkpoints needs it

    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        keys = sorted(loaded)[:10] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(
            f"Expected a state dict of tensors or a dict with one under 'state_dict'; got {keys}. "
            f"Save the model with torch.save(model.state_dict(), path)."
        )
    return {
        key: value.detach().cpu().to(torch.float32).numpy() if value.is_floating_point() else value.detach().cpu().numpy()
        for key, value in state_dict.items()
    }


def check_checkpoint_file(path: str) -> None:
    """Raises FileNotFoundError or ValueError unless `path` looks like what `torch.save` writes: a
    complete zip archive (torch >= 1.6) or a pickle (the legacy format). Needs no torch, so an empty
    or truncated download is named as such before the optional extra is even imported."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No PyTorch checkpoint at {path}; give the .pth file torch.save wrote.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes), e.g. an interrupted download or copy; fetch the checkpoint again.")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        # A zip's directory is at its end: a cut-off download starts right but does not open.
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is a damaged or truncated zip archive ({os.path.getsize(path)} bytes); fetch the checkpoint again.")
    elif not head.startswith(_PICKLE_PROTOCOL):
        raise ValueError(
            f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive (or a pickle before torch 1.6), "
            f"but this file starts with {head!r}. Give the .pth of torch.save(model.state_dict(), path)."
        )


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a `.pth` file (a state dict or an mmcls checkpoint) on the CPU; see `as_numpy_state_dict`."""
    check_checkpoint_file(path)
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            'Reading PyTorch checkpoints needs torch, an optional extra: pip install -e ".[torch]".'
        ) from error
    try:
        # weights_only: a checkpoint is data; refuse the arbitrary code a full unpickle could run.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, which are not loaded for safety "
            f"({error}). Re-save only the weights: torch.save({{'state_dict': model.state_dict()}}, path)."
        ) from error
    except (RuntimeError, EOFError) as error:  # what torch.load raises on a damaged archive or pickle
        raise ValueError(f"torch.load cannot read {path} ({error}); the file is damaged: fetch the checkpoint again.") from error
    return as_numpy_state_dict(loaded)


def _mismatch_report(missing, unexpected, mismatched, state_dict, model_name: str) -> str:
    def listing(title, lines):
        return [f"{title}:", *(f"  {line}" for line in lines)] if lines else []

    lines = [
        f"The state dict does not fit {model_name}: {len(missing)} missing, {len(unexpected)} unexpected and "
        f"{len(mismatched)} shape-mismatched keys (shapes in PyTorch's layout).",
        *listing("Missing (the model needs them; the state dict lacks them)", missing),
        *listing("Unexpected (in the state dict; the model has no such variable)", unexpected),
        *listing("Shape mismatches", mismatched),
    ]
    if any(key.startswith("module.") for key in state_dict):
        lines.append("Keys start with 'module.' (saved from a DataParallel wrapper): strip that prefix and convert again.")
    elif state_dict and not any(key.startswith(("backbone.", "head.")) for key in state_dict):
        lines.append("No key starts with 'backbone.' or 'head.': this converter reads mmcls ImageClassifier names (backbone.stem.0.conv.weight, ..., head.fc.weight).")
    lines.append(
        "Check that --model has the checkpoint's depth (blocks per stage: 26 (1,2,4,1), 38 (2,3,5,2), 50 (3,4,6,3), "
        "101 (3,4,23,3), 152 (3,8,36,3)) and --num-classes the rows of head.fc.weight."
    )
    return "\n".join(lines)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: ResNet, *, model_name: str = "the model") -> dict:
    """Our variables `{"params": ..., "batch_stats": ...}` (float32) from an mmcls RedNet state dict.

    Args:
      state_dict: `{mmcls key: ndarray}` in PyTorch's layouts (see `as_numpy_state_dict`).
      model: the RedNet to fill; its variables' names and shapes say what must be there.
      model_name: how errors name the model.

    Raises:
      StateDictMismatchError: listing every missing, unexpected and shape-mismatched key.
    """
    check_rednet(model)
    # Parameter shapes do not depend on the input's size, so a tiny abstract input is enough.
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    targets = flax.traverse_util.flatten_dict({k: abstract[k] for k in ("params", "batch_stats")})
    converted, used, missing, mismatched = {}, set(), [], []
    for path, target in targets.items():
        key, expected = torch_key(path[1:]), torch_shape(target.shape)
        where = "/".join(path)
        if key not in state_dict:
            missing.append(f"{key} {list(expected)} (for {where})")
            continue
        used.add(key)
        value = np.asarray(state_dict[key])
        if value.shape != expected:
            mismatched.append(f"{key}: {list(value.shape)} in the state dict, {list(expected)} expected (for {where})")
            continue
        converted[path] = from_torch_layout(value.astype(np.float32))
    # BatchNorm's step counter only matters to momentum=None (cumulative) averaging, which mmcls does not use.
    unexpected = [
        f"{key} {list(np.shape(state_dict[key]))}"
        for key in sorted(state_dict) if key not in used and not key.endswith(".num_batches_tracked")
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(_mismatch_report(missing, unexpected, mismatched, state_dict, model_name))
    return flax.traverse_util.unflatten_dict({path: jnp.asarray(value) for path, value in converted.items()})


def train_state(model: ResNet, variables: dict) -> steps.TrainState:
    """The TrainState a training run would start from, holding `variables`.

    `loop.evaluate` restores a checkpoint into the whole TrainState its config builds (params,
    batch_stats, opt_state, step), so the optimizer state must have the structure
    `classification.create_optimizer` gives. It is a fresh one (zero momentum, count 0), which also lets
    `--config.mode=train` in the same workdir fine-tune from the converted weights. The schedule
    numbers below are not part of that state; only its structure is.
    """
    recipe = ml_collections.ConfigDict(
        dict(base_lr=0.1, batch_size=256, warmup_epochs=0.0, warmup_factor=1.0, momentum=0.9, nesterov=True, weight_decay=1e-4,
             static_kernel_lr_mult=1.0)
    )
    tx = classification.create_optimizer(recipe, steps_per_epoch=1, total_steps=1)
    state = steps.train_state(model, tx, variables)
    # As a jitted train step leaves it: every leaf an array (the step too), so the checkpoint reads like a trained one.
    return jax.tree.map(jnp.asarray, state)


def write_checkpoint(model: ResNet, variables: dict, out_dir: str) -> str:
    """Writes `variables` as checkpoint `STEP` of `<out_dir>/checkpoints`; returns its directory.

    Raises:
      FileExistsError: `out_dir` already holds checkpoints (evaluation would restore the latest one,
        which might not be this).
    """
    ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"))
    try:
        if ckpt.all_steps():
            raise FileExistsError(
                f"{ckpt.directory} already holds checkpoints (steps {ckpt.all_steps()}); convert into a new OUT_DIR."
            )
        ckpt.save(STEP, train_state(model, variables))
    finally:
        ckpt.close()
    return os.path.join(ckpt.directory, str(STEP))


def _parse_overrides(text: str) -> dict:
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--overrides is not JSON ({error}); give an object, e.g. '{{\"stem_width\": 64}}'.") from error
    fields = sorted(models.OVERRIDABLE)
    if not isinstance(overrides, dict) or set(overrides) - set(fields):
        raise ValueError(f"--overrides must be a JSON object of ResNet fields ({', '.join(fields)}), e.g. '{{\"stem_width\": 64}}'; got {text!r}.")
    # Flax module fields must be hashable: JSON lists become tuples.
    return {key: tuple(value) if isinstance(value, list) else value for key, value in overrides.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cvolution_jax.convert.torch_rednet",
        description="Convert a PyTorch RedNet (involution / mmcls) checkpoint into OUT_DIR/checkpoints/0, "
        "which `python -m experiments.imagenet --workdir OUT_DIR --config.mode=eval` restores.",
    )
    parser.add_argument("source", metavar="IN.pth", help="state dict, raw or mmcls's {'state_dict': ...}")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="workdir to create; the checkpoint goes to OUT_DIR/checkpoints/0")
    parser.add_argument("--model", required=True, help="registry name: rednet26, rednet38, rednet50, rednet101, rednet152")
    parser.add_argument("--num-classes", type=int, default=1000, help="rows of head.fc.weight (default 1000)")
    parser.add_argument("--overrides", default="{}", help='JSON of ResNet fields, as config.model.overrides, e.g. \'{"widths": [32, 64, 128, 256]}\'')
    args = parser.parse_args(argv)
    if args.num_classes < 1:
        parser.error(f"--num-classes must be >= 1 (the rows of head.fc.weight); got {args.num_classes}.")
    try:
        overrides = _parse_overrides(args.overrides)
        model = models.create(args.model, num_classes=args.num_classes, **overrides)
        check_rednet(model)
        variables = convert_state_dict(load_state_dict(args.source), model, model_name=args.model)
        directory = write_checkpoint(model, variables, args.out_dir)
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as error:
        sys.exit(f"error: {error}")
    record = {"source": os.path.abspath(args.source), "model": args.model, "num_classes": args.num_classes, "overrides": overrides, "step": STEP}
    with open(os.path.join(args.out_dir, "conversion.json"), "w") as f:
        json.dump(record, f, indent=2)
    count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    print(f"Converted {args.source} ({count / 1e6:.2f}M parameters) into {args.model}: {directory}")
    if not overrides and args.num_classes == 1000:
        print(f"Evaluate: python -m experiments.imagenet --config experiments/configs/{args.model}.py --workdir {args.out_dir} --config.mode=eval --config.data.data_dir=/path/to/imagenet")


if __name__ == "__main__":
    main()
