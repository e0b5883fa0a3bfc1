"""kernel_maps and experiments.visualize on the tiny digits CedNet (tests/tiny_config.py, stage 2 widened): the captured
kernels against a numpy recomputation from the layer's own parameters, the CLI's PNG and its errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from cvolution_jax import kernel_maps
from cvolution_jax.data import semantic
from cvolution_jax.data.semantic_records import SemanticRecord
from cvolution_jax.tasks import classification, detection, segmentation
from cvolution_jax.train import checkpoint, loop, steps
from experiments import visualize
from experiments.configs import coco_default, segmentation_default
from tests import tiny_config

EPS = 1e-5  # BatchNorm epsilon (layers.batch_norm)
LAYERS = ["stem_op", "layer1_0/conv2", "layer2_0/conv2"]


def random_variables(model, *init_args, seed=0):
    """Variables of `model` with random values everywhere, BatchNorm statistics included, so every
    term of the generator matters (init's zero biases and unit variances would hide some).
    From `eval_shape`: a real init compiles the whole model, which takes seconds here."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), *init_args)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (0.5 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def save_run(root, config, model, variables, step: int, best_metric: str = "top1") -> None:
    """What a training entry point leaves in workdir `root`: config.json and checkpoint `step` of `variables`."""
    loop.save_config(config, str(root))
    ckpt = checkpoint.Checkpointer(str(root / "checkpoints"), best_metric=best_metric)
    ckpt.save(step, steps.train_state(model, optax.sgd(0.1), variables))
    ckpt.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir as experiments.imagenet leaves it: config.json and a checkpoint at step 3."""
    root = tmp_path_factory.mktemp("kernel_maps")
    config = tiny_config.get_config()
    config.model.overrides = {**config.model.overrides, "widths": (16, 32)}  # stage 2: 2 groups of 16 channels
    size = config.data.image_size
    model = classification.create_model(config, num_classes=10)
    variables = random_variables(model, jnp.zeros((1, size, size, 1)))
    save_run(root, config, model, variables, 3)
    image = np.random.default_rng(1).integers(0, 256, (20, 12, 3), dtype=np.uint8)  # not square: cropped
    Image.fromarray(image).save(root / "digit.png")
    return root, config, model, variables


# --------------------------------------------------------------------- an independent generator


def batch_norm(x, stats, params):
    return (x - stats["mean"]) / np.sqrt(stats["var"] + EPS) * params["scale"] + params["bias"]


def conv_dilated3x3(x, kernel, dilation=2):
    """`[B, H, W, Cin] x [3, 3, Cin, Cout]`, stride 1, zero padding `dilation`, as a loop over taps."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (dilation, dilation), (dilation, dilation), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]), np.float64)
    for kh in range(3):
        for kw in range(3):
            out += padded[:, kh * dilation:kh * dilation + h, kw * dilation:kw * dilation + w] @ kernel[kh, kw]
    return out


def reference_kernels(x, params, stats, stride, kernel_size):
    """docs/cvolution.md's C-volution generator from the parameter arrays, in float64 numpy:
    ceil-mode average pool, 1x1 reduce + BN + ReLU, dilated 3x3 context + BN + ReLU, 1x1 span."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    ho, wo = -(-h // stride), -(-w // stride)
    pooled = np.zeros((b, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            pooled[:, i, j] = x[:, i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].mean(axis=(1, 2))
    gen, gen_stats = params["generator"], stats["generator"]
    u = np.maximum(batch_norm(pooled @ gen["reduce_conv"]["kernel"][0, 0], gen_stats["reduce_bn"], gen["reduce_bn"]), 0)
    u = np.maximum(batch_norm(conv_dilated3x3(u, gen["context_conv"]["kernel"]), gen_stats["context_bn"], gen["context_bn"]), 0)
    span = u @ gen["span_conv"]["kernel"][0, 0] + gen["span_conv"]["bias"]
    return span.reshape(b, ho, wo, c // 16, kernel_size**2)


def layer_input(model, variables, images, layer):
    """The feature map entering `layer`: ReLU of the BatchNorm just before it."""
    before = {"stem_op": ("stem_bn1",), "layer1_0/conv2": ("layer1_0", "bn1"), "layer2_0/conv2": ("layer2_0", "bn1")}[layer]
    capture = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=lambda m, name: tuple(m.path) == before,
                                               mutable=["intermediates"])[1])
    node = capture(variables, images)["intermediates"]
    for name in before:
        node = node[name]
    return np.maximum(np.asarray(node["__call__"][0]), 0)


# ------------------------------------------------------------------------------------- tests


def test_layers_are_listed_in_network_order_with_stage_2_as_default(workdir):
    _, _, _, variables = workdir
    layers = kernel_maps.spatial_op_layers(variables)
    assert layers == LAYERS
    assert kernel_maps.default_layer(layers) == "layer2_0/conv2"
    detector_like = {"params": {"neck": {f"output{i}": {"generator": {"span_conv": {}}} for i in (10, 2)},
                                "backbone": {"layer3_10": {"conv2": {"generator": {"span_conv": {}}}},
                                             "layer3_2": {"conv2": {"generator": {"span_conv": {}}}}}}}
    assert kernel_maps.spatial_op_layers(detector_like) == [
        "backbone/layer3_2/conv2", "backbone/layer3_10/conv2", "neck/output2", "neck/output10"]
    assert kernel_maps.default_layer(["neck/output0", "neck/output1"]) == "neck/output0"


@pytest.mark.parametrize("layer, stride, groups", [("stem_op", 1, 1), ("layer2_0/conv2", 2, 2)])
def test_dynamic_kernels_equal_the_generator_recomputed_from_its_parameters(workdir, layer, stride, groups):
    _, config, model, variables = workdir
    size = config.data.image_size
    images = np.random.default_rng(2).standard_normal((2, size, size, 1)).astype(np.float32)
    kernels = kernel_maps.dynamic_kernels(model, variables, images, layer, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    for name in layer.split("/"):
        params, stats = params[name], stats[name]
    k = 3  # the stem's op, and the bottleneck ops of tiny_config
    x = layer_input(model, variables, images, layer)
    expected = reference_kernels(x, jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, stats), stride, k)
    assert kernels.shape == (2, -(-x.shape[1] // stride), -(-x.shape[2] // stride), groups, k * k)
    np.testing.assert_allclose(kernels, expected, rtol=1e-4, atol=1e-4)
    maps = kernel_maps.heat_maps(kernels[1])
    np.testing.assert_allclose(maps[groups - 1], expected[1, :, :, groups - 1].sum(-1), rtol=1e-4, atol=1e-4)


def test_cli_writes_a_png_of_the_expected_size(workdir, tmp_path):
    root, config, _, _ = workdir
    out = tmp_path / "maps.png"
    flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(checkpoint=str(root / "checkpoints"), image=str(root / "digit.png"), layer="layer2_0/conv2",
                             out=str(out), groups=8, pixel="3,10"):
        visualize.main(["visualize"])
    with Image.open(out) as picture:
        assert picture.size == kernel_maps.figure_size(2)  # 32 channels: 2 groups, both drawn
    # The default layer and output path, from the workdir itself.
    path = visualize.visualize(str(root), str(root / "digit.png"), groups=1)
    assert path == os.path.join(str(root), "kernels_digit_layer2_0_conv2.png")
    with Image.open(path) as picture:
        assert picture.size == kernel_maps.figure_size(1) == (2 * kernel_maps.PANEL, kernel_maps.PANEL + kernel_maps.TITLE)


def test_an_unknown_layer_is_refused_with_the_list_of_layers(workdir):
    root, config, model, variables = workdir
    images = np.zeros((1, config.data.image_size, config.data.image_size, 1), np.float32)
    with pytest.raises(ValueError, match=r"No involution or C-volution layer 'layer2_0/conv1'.*stem_op, layer1_0/conv2, layer2_0/conv2"):
        kernel_maps.dynamic_kernels(model, variables, images, "layer2_0/conv1")
    flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(checkpoint=str(root), image=str(root / "digit.png"), layer="layer9_0/conv2"):
        with pytest.raises(SystemExit, match=r"layer9_0/conv2.*Its layers are: stem_op, layer1_0/conv2, layer2_0/conv2"):
            visualize.main(["visualize"])


def test_out_that_is_a_directory_is_refused_before_anything_is_loaded(tmp_path):
    flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(checkpoint=str(tmp_path / "no_run"), image="x.png", out=str(tmp_path)):
        with pytest.raises(SystemExit, match=rf"--out {tmp_path} is a directory; give the PNG's path, e.g. --out {tmp_path}/kernels.png"):
            visualize.main(["visualize"])
    assert os.listdir(tmp_path) == []


def test_a_workdir_without_config_json_is_refused_naming_the_file(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist: the checkpoint path must be a training workdir"):
        kernel_maps.load_run(str(tmp_path / "checkpoints"))
    (tmp_path / "checkpoints").rmdir()
    (tmp_path / "config.json").write_text("{}")
    flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(checkpoint=str(tmp_path), image="x.png"):
        with pytest.raises(SystemExit, match=r"checkpoints does not exist: the checkpoint path must be a training workdir"):
            visualize.main(["visualize"])


def test_a_detection_run_draws_its_fpn_output_op(tmp_path):
    """A C-volution neck on a conv backbone: the default is the neck's first op, on the image resized
    as detection evaluation does (120x200 -> 58x96 for scale (96, 64); P2 is ceil(58/4) x ceil(96/4))."""
    config = coco_default.get_config()
    config.model.update(backbone_overrides={"stage_sizes": (1, 1, 1, 1), "widths": (4, 8, 8, 16), "stem_width": 8},
                        channels=16, fc_dim=32)
    config.data.update(scale=(96, 64), buckets=((64, 96),))
    model = detection.create_detector(config, num_classes=3)
    batch = {"image": jnp.zeros((1, 64, 96, 3)), "image_size": jnp.asarray([[64, 96]], jnp.int32)}
    variables = random_variables(model, batch)
    save_run(tmp_path, config, model, variables, 2, best_metric="AP")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(tmp_path / "street.jpg")

    run = kernel_maps.load_run(str(tmp_path))
    assert (run.task, run.step) == ("detection", 2)
    assert kernel_maps.spatial_op_layers(run.variables) == [f"neck/output{i}" for i in range(4)]
    with Image.open(tmp_path / "street.jpg") as picture:
        inputs, display = kernel_maps.preprocess(run.config, picture)
    assert inputs.shape == (1, 58, 96, 3) and display.shape == (58, 96, 3)
    layer = kernel_maps.default_layer(kernel_maps.spatial_op_layers(run.variables))
    assert layer == "neck/output0"
    kernels = kernel_maps.dynamic_kernels(run.model, run.variables, inputs, layer, **run.apply_kwargs)
    assert kernels.shape == (1, 15, 24, 1, 49)
    assert kernel_maps.render(display, kernels[0], str(tmp_path / "maps.png"), pixel=(57, 95)) == kernel_maps.figure_size(1)


def test_a_segmentation_run_draws_its_fpn_output_op(tmp_path):
    """A segmentation workdir also has `model.backbone`; it was taken for a detector's. Its task now
    says what it is: its segmentor, and the eval pass's preprocessing (resized to scale (64, 64)
    keeping the ratio, 40x64, padded to 64x64 as the eval pass pads to a multiple of 32)."""
    config = segmentation_default.get_config()
    config.model.update(backbone_overrides={"stage_sizes": (1, 1, 1, 1), "widths": (4, 8, 8, 16), "stem_width": 8},
                        channels=16, head_channels=8)
    config.data.update(scale=(64, 64), crop_size=(64, 64))
    model = segmentation.create_model(config, num_classes=4)
    variables = random_variables(model, jnp.zeros((1, 64, 64, 3)))
    save_run(tmp_path, config, model, variables, 5, best_metric="mIoU")
    photo = np.random.default_rng(4).integers(0, 256, (100, 160, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "street.png")

    run = kernel_maps.load_run(str(tmp_path))
    assert (run.task, run.step, run.model.decode_head.num_classes) == ("segmentation", 5, 4)
    assert kernel_maps.spatial_op_layers(run.variables) == [f"neck/output{i}" for i in range(4)]
    with Image.open(tmp_path / "street.png") as picture:
        inputs, display = kernel_maps.preprocess(run.config, picture)
    assert inputs.shape == (1, 64, 64, 3) and display.shape == (64, 64, 3)
    assert not display[40:].any() and not inputs[0, 40:].any()  # the eval pass's zero padding
    # The eval pass's own transform of the same file gives the same input.
    record = SemanticRecord(str(tmp_path / "street.png"), height=100, width=160)  # painted: all background
    example = semantic.EvalTransform(4, (64, 64), (64, 64), (100, 160))(record)
    np.testing.assert_array_equal(example["image"], inputs[0])
    kernels = kernel_maps.dynamic_kernels(run.model, run.variables, inputs, "neck/output0", **run.apply_kwargs)
    assert kernels.shape == (1, 16, 16, 1, 49)

    out = tmp_path / "maps.png"
    visualize.visualize(str(tmp_path), str(tmp_path / "street.png"), out=str(out))
    with Image.open(out) as drawn:
        assert drawn.size == kernel_maps.figure_size(1)
