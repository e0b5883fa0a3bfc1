"""Heat maps of the dynamic kernels of an involution / C-volution layer, as in the involution paper.

    run = kernel_maps.load_run("runs/cednet50")                       # a training workdir
    inputs, display = kernel_maps.preprocess(run.config, PIL.Image.open("cat.jpg"))
    layer = kernel_maps.default_layer(kernel_maps.spatial_op_layers(run.variables))
    kernels = kernel_maps.dynamic_kernels(run.model, run.variables, inputs, layer, **run.apply_kwargs)
    kernel_maps.render(display, kernels[0], "kernels.png", groups=8, title=layer)

A layer is named by its '/'-joined module path in the variables tree, the path of the module
that owns `generator/`: `stem_op`, `layer2_0/conv2` (stage 2, block 0, the bottleneck's op) in a
classifier; `backbone/layer2_0/conv2`, `neck/output0` (the FPN's P2 output op) or
`rpn_head/rpn_conv` in a detector. `spatial_op_layers` lists them in network order.

What is drawn: layer `layer` generates `Hd: [B, Ho, Wo, G, K*K]`, one K x K kernel per output
pixel and group of 16 channels (docs/cvolution.md, "Kernel generation"). As in the involution
paper's figure, the heat map of group g is the sum of its K*K taps at each pixel,
`map[i, j] = sum_k Hd[i, j, g, k]`: how strongly (and with which sign) the kernel at that pixel
passes its neighbourhood on. C-volution's static channel kernel `S` is the same at every pixel, so
it is left out: the maps show the part of the kernel that depends on the image.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from cvolution_jax import tasks
from cvolution_jax.files import atomic_open
from cvolution_jax.train import checkpoint
from kernels import reference

# The picture: square panels of PANEL pixels (input image first, then one per group), at most
# MAX_COLUMNS a row, under a TITLE-pixel band. DPI 64 makes every size a whole number of inches
# over 64ths, so the PNG has exactly `figure_size` pixels.
PANEL = 256
TITLE = 56
MAX_COLUMNS = 5
DPI = 64
CAPTION = 26  # pixels above each panel's image for its caption

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


# --------------------------------------------------------------------------------- the layers


def _natural_key(name: str) -> tuple:
    """`layer3_10` after `layer3_2`; stems and backbones before the stages and heads they feed."""
    rank = 0 if name.startswith("stem") or name == "backbone" else 2 if name.startswith(("rpn", "roi", "box", "mask")) else 1
    return rank, tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def spatial_op_layers(variables) -> list[str]:
    """The '/'-joined paths of every involution and C-volution layer of `variables`, in network order.

    A layer is a module whose parameters hold a kernel generator (`generator/span_conv`), so this
    finds `Involution` and `CVolution` in any model, e.g. `["stem_op", "layer1_0/conv2", ...]` for a
    CedNet classifier or `["backbone/layer1_0/conv2", ..., "neck/output0", ...]` for a detector.
    Network order: stem, stages and blocks by number (`layer3_10` after `layer3_2`), then neck and heads.

    Args:
      variables: a flax variables dict (`{"params": ..., "batch_stats": ...}`).
    """
    if not isinstance(variables, collections.abc.Mapping) or "params" not in variables:
        raise ValueError(
            f"spatial_op_layers: expected a flax variables dict with a 'params' collection; got "
            f"{type(variables).__name__} with keys {list(variables) if isinstance(variables, collections.abc.Mapping) else '-'}. "
            f"Pass what `model.init` returns or `Checkpointer.restore_variables` gives."
        )
    found = []

    def walk(node, path):
        generator = node.get("generator")
        if isinstance(generator, collections.abc.Mapping) and "span_conv" in generator:
            found.append(path)
        for name, child in node.items():
            if isinstance(child, collections.abc.Mapping) and name != "generator":
                walk(child, (*path, name))

    walk(variables["params"], ())
    found.sort(key=lambda path: [_natural_key(name) for name in path])
    return ["/".join(path) for path in found]


def default_layer(layers: list[str]) -> str:
    """The layer drawn when none is named: the last op of stage 2 (`layer2_*`), else the first op.

    Stage 2 is a middle ground: its kernels (a 28x28 grid at 224x224, 8 groups in RedNet/CedNet-50)
    are dense enough to follow the image, deeper than the stem and stage 1, and plentiful enough to
    fill the picture; its last block has seen the most of the stage. A model without a stage-2 op
    (a detector with a conv backbone and a C-volution neck) gets its first op, e.g. `neck/output0`.
    """
    if not layers:
        raise ValueError(
            "This model has no involution or C-volution layer (its spatial ops are convolutions, e.g. a ResNet), "
            "so it has no dynamic kernels to draw. Use a RedNet or CedNet run, or a detector with an op neck."
        )
    stage2 = [layer for layer in layers if any(part.startswith("layer2_") for part in layer.split("/"))]
    return stage2[-1] if stage2 else layers[0]


def _unknown_layer(layer: str, layers: list[str]) -> ValueError:
    return ValueError(
        f"No involution or C-volution layer {layer!r} in this model. Its layers are: {', '.join(layers) or 'none'}. "
        f"Pass one of them (a '/'-joined module path) as the layer."
    )


# -------------------------------------------------------------------------------- the kernels


def dynamic_kernels(module: nn.Module, variables, images, layer: str, **apply_kwargs) -> np.ndarray:
    """The kernels layer `layer` generates for `images`: float32 `[B, Ho, Wo, G, K*K]`.

    Runs `module.apply(variables, images, **apply_kwargs)` with flax's `capture_intermediates`
    on the layer's `generator` only, so the model is used exactly as trained (BatchNorm on its
    running averages when `train` is False, the default of our models); under `jit`, nothing
    after the layer is computed. Tap `k = kh*K + kw` of group `g` (channels `16g..16g+15`).
    A layer called more than once per pass (the RPN's shared `rpn_conv`, once per FPN level)
    gives the kernels of its first call (P2).

    Args:
      module: the flax model, e.g. `models.create("cednet50")` or a `FasterRCNN`.
      variables: its variables (`params`, `batch_stats`).
      images: `[B, H, W, C]`, preprocessed as the model's training did (see `preprocess`).
      layer: a path from `spatial_op_layers(variables)`, e.g. "layer2_0/conv2".
      **apply_kwargs: passed to `module.apply`, e.g. `method=...` to run a detector's features.

    Raises:
      ValueError: `layer` is not an involution / C-volution layer of `variables` (the message
        lists those that are), or the forward pass never reaches it.
    """
    layers = spatial_op_layers(variables)
    if layer not in layers:
        raise _unknown_layer(layer, layers)
    target = (*layer.split("/"), "generator")
    generator = {}

    def wanted(mdl: nn.Module, method_name: str) -> bool:
        if method_name != "__call__" or tuple(mdl.path) != target:
            return False
        generator.update(kernel_size=mdl.kernel_size)
        return True

    def forward(variables, images):
        _, state = module.apply(variables, images, capture_intermediates=wanted, mutable=["intermediates"], **apply_kwargs)
        node = state.get("intermediates", {})
        for name in target:
            node = node.get(name, {})
        if "__call__" not in node:
            return None
        generated = node["__call__"][0]
        if isinstance(generated, tuple):
            # A layer with fuse_generator returns (u, W2, b) and leaves Hd = u @ W2 + b to the kernel.
            features, span_kernel, span_bias = (a.astype(jnp.float32) for a in generated)
            generated = reference.dynamic_kernel(features, span_kernel, span_bias, kernel_size=generator["kernel_size"])
        return generated.astype(jnp.float32)

    kernels = jax.jit(forward)(variables, jnp.asarray(images))
    if kernels is None:
        raise ValueError(
            f"Layer {layer!r} is in the variables but the forward pass ({apply_kwargs.get('method', '__call__')}) never ran it. "
            f"Pass apply_kwargs that run the part of the model holding it."
        )
    return np.asarray(kernels)


# ------------------------------------------------------------------------------ a trained run


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A trained model as a training workdir holds it.

    Attributes:
      workdir: the training workdir (`experiments.imagenet`, `.coco` or `.cityscapes`).
      config: its `config.json`.
      task: its task's name (`config.task`, `cvolution_jax.tasks.TASKS`).
      model: the flax module that config builds, with the checkpoint's number of classes.
      variables: the checkpoint's `params` and `batch_stats`.
      step: the checkpoint's step (the one restored: a damaged latest one is skipped).
      apply_kwargs: what `dynamic_kernels` passes to `model.apply` to run every spatial op.
    """

    workdir: str
    config: ml_collections.ConfigDict
    task: str
    model: nn.Module
    variables: dict
    step: int
    apply_kwargs: dict


def _tuples(value):
    """JSON gives lists where the config had tuples; flax module fields must be hashable."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def load_run(path: str, step: int | None = None) -> RestoredRun:
    """The model, config and checkpoint `step` (default: the latest) of a training workdir.

    Args:
      path: a workdir of any task's entry point (`experiments.imagenet`, `experiments.coco`,
        `experiments.cityscapes`: it holds `config.json` and `checkpoints/`), or its `checkpoints` folder.

    Raises:
      FileNotFoundError: `config.json` or `checkpoints/` is missing (naming which), or there is no
        checkpoint at `step`.
    """
    path = os.path.abspath(os.path.expanduser(path))
    workdir = os.path.dirname(path) if os.path.basename(path) == CHECKPOINTS else path
    for name in (CONFIG_FILE, CHECKPOINTS):
        if not os.path.exists(os.path.join(workdir, name)):
            raise FileNotFoundError(
                f"{os.path.join(workdir, name)} does not exist: the checkpoint path must be a training workdir "
                f"(holding {CONFIG_FILE} and {CHECKPOINTS}/) or its {CHECKPOINTS} folder. Point it at the --workdir of "
                f"a training run of experiments.imagenet, experiments.coco or experiments.cityscapes."
            )
    config_file = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(config_file) as f:
            config = ml_collections.ConfigDict(_tuples(json.load(f)))
    except ValueError as error:
        raise ValueError(f"{config_file} is not the JSON a run saves ({error}): it was damaged or edited. Write it again "
                         f"from the run's config file (the training log prints it at the start).") from None
    task = tasks.get(config)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINTS), best_metric=task.best_metric)
    try:
        variables = ckpt.restore_variables(step)
        step = ckpt.restored_step  # not the latest when that one is damaged
    finally:
        ckpt.close()
    model = task.create_model(config, task.num_classes(config, variables))
    return RestoredRun(workdir, config, task.name, model, variables, int(step), task.inference_kwargs())


# ----------------------------------------------------------------------------- preprocessing


def preprocess(config: ml_collections.ConfigDict, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """One image as the run's evaluation saw its data: `(inputs [1, H, W, C] float32, display [H, W, 3] uint8)`,
    as the run's task (`config.task`) says; `display` is what the model saw, as pixels."""
    return tasks.get(config).preprocess_image(config, image)


# --------------------------------------------------------------------------------- the picture


def heat_maps(kernels: np.ndarray) -> np.ndarray:
    """`[Ho, Wo, G, K*K] -> [G, Ho, Wo]`: each group's kernel summed over its K*K taps (the paper's heat map)."""
    kernels = np.asarray(kernels, np.float32)
    if kernels.ndim != 4:
        raise ValueError(f"kernels must be one image's [Ho, Wo, G, K*K]; got shape {kernels.shape}. Index the batch first.")
    return np.moveaxis(kernels.sum(axis=-1), -1, 0)


def figure_size(num_maps: int) -> tuple[int, int]:
    """(width, height) in pixels of `render`'s PNG with `num_maps` heat maps (plus the input panel)."""
    panels = num_maps + 1
    columns = min(panels, MAX_COLUMNS)
    return columns * PANEL, math.ceil(panels / columns) * PANEL + TITLE


def render(display: np.ndarray, kernels: np.ndarray, path: str, *, groups: int = 8, pixel: tuple[int, int] | None = None,
           title: str = "", colormap: str = "turbo") -> tuple[int, int]:
    """Draws the input and the heat maps of the first `groups` groups over it; writes a PNG.

    Each heat map (see `heat_maps`) spans the whole image, one cell per output pixel of the layer
    (a cell covers the stride x stride input pixels it was computed for), bilinearly interpolated,
    overlaid on the image with `colormap` scaled to that map's own min..max (printed over it).
    With `pixel = (y, x)` (input pixels), each map marks it and shows, inset, the K x K kernel of
    the output pixel covering it (blue negative, red positive, symmetric about 0).

    Args:
      display: the model's input as uint8 pixels `[H, W, 3]` (`preprocess`'s second output).
      kernels: `[Ho, Wo, G, K*K]`, one image of `dynamic_kernels`.
      path: where to write the PNG (atomically; folders are created).
      groups: how many groups to draw (the first ones; all of them if the layer has fewer).

    Returns:
      The PNG's (width, height): `figure_size(min(groups, G))`.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, works on a headless host

    maps = heat_maps(kernels)
    num_groups, out_height, out_width = maps.shape
    taps = kernels.shape[-1]
    size = math.isqrt(taps)
    if size * size != taps:
        raise ValueError(f"kernels' last axis must hold K*K taps; got {taps}, not a square.")
    if groups < 1:
        raise ValueError(f"groups must be >= 1; got {groups}.")
    display = np.asarray(display)
    height, width = display.shape[:2]
    cell = None
    if pixel is not None:
        y, x = pixel
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"pixel (y, x) = {pixel} is outside the {height}x{width} model input; pick 0 <= y < {height}, 0 <= x < {width}.")
        cell = (y * out_height // height, x * out_width // width)
    shown = min(groups, num_groups)
    fig_width, fig_height = figure_size(shown)
    columns = min(shown + 1, MAX_COLUMNS)
    fig = Figure(figsize=(fig_width / DPI, fig_height / DPI), dpi=DPI, facecolor="white")
    fig.text(0.5, 1 - 18 / fig_height, title, ha="center", va="center", fontsize=15)
    fig.text(0.5, 1 - 42 / fig_height, f"{size}x{size} kernels, {num_groups} groups, {out_height}x{out_width} grid; "
             f"heat map: sum of a kernel's taps", ha="center", va="center", fontsize=12)
    margin = 6
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the maps cover exactly the image

    grey = np.repeat(np.asarray(Image.fromarray(display).convert("L"))[..., None], 3, axis=-1)

    def panel(index: int, caption: str, underlay: np.ndarray):
        row, column = divmod(index, columns)
        top = TITLE + row * PANEL
        ax = fig.add_axes((
            (column * PANEL + margin) / fig_width, 1 - (top + PANEL - margin) / fig_height,
            (PANEL - 2 * margin) / fig_width, (PANEL - CAPTION - 2 * margin) / fig_height,
        ))
        ax.set_axis_off()
        ax.set_title(caption, fontsize=13)
        ax.imshow(underlay, extent=extent, interpolation="bilinear" if max(height, width) < PANEL else "antialiased")
        if cell is not None:
            ax.plot([pixel[1]], [pixel[0]], marker="+", color="white", markersize=14, markeredgewidth=2.5)
        return ax

    panel(0, f"input {height}x{width}" + ("" if cell is None else f", + at {tuple(pixel)}"), display)
    for g in range(shown):
        low, high = float(maps[g].min()), float(maps[g].max())
        # A grey underlay keeps the colormap's colours readable over colour images.
        ax = panel(g + 1, f"group {g}: {low:.2f} .. {high:.2f}", grey)
        ax.imshow(maps[g], extent=extent, cmap=colormap, vmin=low, vmax=high if high > low else low + 1e-6, alpha=0.55,
                  interpolation="bilinear")
        if cell is not None:
            kernel = kernels[cell[0], cell[1], g].reshape(size, size)
            bound = float(np.abs(kernel).max()) or 1.0
            inset = ax.inset_axes((0.66, 0.0, 0.34, 0.34))
            inset.imshow(kernel, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
            inset.set_xticks([])
            inset.set_yticks([])
            for spine in inset.spines.values():
                spine.set_edgecolor("white")
                spine.set_linewidth(1.5)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, facecolor="white")
    return fig_width, fig_height

