"""The model registry and the three families: shapes, finite gradients, BatchNorm modes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvolution_jax import models
from cvolution_jax.layers import SpatialOp


def test_names_cover_the_zoo():
    assert models.names() == [
        "resnet50", "resnet101", "resnet152",
        "rednet26", "rednet38", "rednet50", "rednet101", "rednet152",
        "cednet26", "cednet38", "cednet50", "cednet101", "cednet152",
    ]


@pytest.mark.parametrize("name", ["resnet26", "cednet", "rednet50x", "vit"])
def test_unknown_name_lists_valid_names(name):
    with pytest.raises(ValueError, match=rf"Unknown model '{name}'\. Valid names: resnet50, .*cednet152"):
        models.create(name)


def test_registry_maps_names_to_constructors_with_the_papers_layouts():
    """Each name is a constructor: the family's op and stem at the depth's stage sizes (the zoo's)."""
    expected = {"resnet": (SpatialOp("conv", kernel_size=3), "resnet"),
                "rednet": (SpatialOp("involution", kernel_size=7), "rednet"),
                "cednet": (SpatialOp("cvolution", kernel_size=7), "rednet")}
    for name, constructor in models.MODELS.items():
        family, depth = name[:6], int(name[6:])
        model = constructor(num_classes=3)
        assert (model.op, model.stem) == expected[family]
        assert tuple(model.stage_sizes) == models.STAGE_SIZES[depth] and model.num_classes == 3
    assert dict(models.STAGE_SIZES) == {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                                        152: (3, 8, 36, 3)}


def test_op_kwargs_and_overrides_reach_the_network():
    model = models.create("cednet50", op_kwargs={"kernel_size": 5}, widths=(16, 32, 48, 64), stem="small")
    assert model.op == SpatialOp("cvolution", kernel_size=5) and model.stem == "small"
    assert tuple(model.widths) == (16, 32, 48, 64) and tuple(model.stage_sizes) == (3, 4, 6, 3)
    with pytest.raises(ValueError, match=r"cednet50: op_kwargs .*kernel_sise"):
        models.create("cednet50", op_kwargs={"kernel_sise": 5})
    with pytest.raises(ValueError, match=r"Unknown ResNet field\(s\) depth .*valid: stage_sizes"):
        models.create("cednet50", depth=3)


@pytest.mark.parametrize("name,stem,size", [("resnet50", "resnet", 67), ("rednet26", "rednet", 64),
                                            ("cednet26", "small", 33)])
def test_backbone_contract_stage_channels_and_strides_are_the_stages(name, stem, size):
    """`stage_channels` and `stage_strides` (the `Backbone` contract detectors and segmentors read)
    are what `return_stages=True` gives, sizes rounded up, for each stem."""
    model = models.create(name, stem=stem, stage_sizes=(1, 1, 1, 1), widths=(16, 16, 32, 32), stem_width=32)
    assert isinstance(model, models.Backbone)
    stages = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, return_stages=True)[0],
                            jnp.zeros((1, size, size, 3)))
    assert model.stage_channels == (64, 64, 128, 128)
    assert [s.shape for s in stages] == [(1, -(-size // stride), -(-size // stride), channels)
                                         for stride, channels in zip(model.stage_strides, model.stage_channels)]
    assert model.stage_strides == ((2, 4, 8, 16) if stem == "small" else (4, 8, 16, 32))


# The RedNet/CedNet size is odd so stride-2 ops see odd inputs (ceil-mode pooling in the generator).
# The K=7 networks compile for 20-45 s on 2 CPU cores: slow; their ops are tested in test_layers and
# test_ops, and a small CedNet trains in test_experiments_imagenet.
@pytest.mark.parametrize("name,size", [("resnet50", 32), pytest.param("rednet26", 33, marks=pytest.mark.slow),
                                       pytest.param("cednet26", 33, marks=pytest.mark.slow)])
def test_forward_backward_is_finite(name, size):
    model = models.create(name, num_classes=7)
    images = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    labels = jnp.array([1, 5])
    variables = jax.jit(model.init)(jax.random.key(1), images)

    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # The classifier and the first convolution both receive gradient.
    assert np.abs(grads["fc"]["kernel"]).sum() > 0 and np.abs(grads["stem_conv1"]["kernel"]).sum() > 0
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_last_batchnorm_of_each_block_starts_at_zero():
    params = jax.jit(models.create("rednet26").init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    blocks = [k for k in params if k.startswith("layer")]
    assert len(blocks) == 1 + 2 + 4 + 1
    for block in blocks:
        assert not np.asarray(params[block]["bn3"]["scale"]).any()
        assert np.asarray(params[block]["bn2"]["scale"]).all()


def test_eval_mode_uses_running_statistics():
    """In eval mode an image's logits do not depend on the rest of its batch; in train mode they do."""
    # One block per stage: what is tested is each BatchNorm's mode, not depth (compiles 2x faster).
    model = models.create("cednet26", num_classes=5, widths=(16, 16, 16, 16), stem_width=32, stage_sizes=(1, 1, 1, 1))
    images = jax.random.normal(jax.random.key(2), (3, 33, 33, 3))
    variables = jax.jit(model.init)(jax.random.key(3), images)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    _, updates = apply(variables, images, train=True, mutable=("batch_stats",))
    variables = {**variables, **updates}
    # Give the residual branches weight so batch statistics reach the logits.
    variables["params"] = jax.tree_util.tree_map_with_path(lambda p, v: jnp.ones_like(v) if "bn3" in str(p) and "scale" in str(p) else v, variables["params"])
    alone = apply(variables, images[:1])
    batched = apply(variables, images)
    np.testing.assert_allclose(alone[0], batched[0], rtol=1e-5, atol=1e-6)
    alone_train, _ = apply(variables, images[:2], train=True, mutable=("batch_stats",))
    batched_train, _ = apply(variables, images, train=True, mutable=("batch_stats",))
    assert np.abs(alone_train[0] - batched_train[0]).max() > 1e-4


def test_bfloat16_compute_keeps_float32_parameters():
    images = jax.random.normal(jax.random.key(4), (2, 33, 33, 3))
    # One block per stage: the same layers in bfloat16, compiled 2x faster than CedNet-26's 1-2-4-1.
    f32 = models.create("cednet26", num_classes=10, stage_sizes=(1, 1, 1, 1))
    bf16 = models.create("cednet26", num_classes=10, stage_sizes=(1, 1, 1, 1), dtype=jnp.bfloat16)
    variables = jax.jit(f32.init)(jax.random.key(5), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(jax.eval_shape(bf16.init, jax.random.key(5), images))} == {jnp.dtype(jnp.float32)}
    variables["params"] = jax.tree_util.tree_map_with_path(lambda p, v: jnp.ones_like(v) if "bn3" in str(p) and "scale" in str(p) else v, variables["params"])
    variables["params"]["fc"]["kernel"] = variables["params"]["fc"]["kernel"] * 100
    out32 = jax.jit(f32.apply)(variables, images)
    out16 = jax.jit(bf16.apply)(variables, images)
    assert out16.dtype == jnp.float32
    scale = np.abs(np.asarray(out32)).max()
    assert scale > 1e-2
    np.testing.assert_allclose(out16, out32, atol=0.1 * scale)
    assert np.abs(out16 - out32).max() > 0  # it really ran in bfloat16


def test_cvolution_ablation_switches_reach_every_op():
    variables = jax.eval_shape(
        models.create("cednet26", op_kwargs=(("context", "none"), ("channel_branch", False))).init,
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
    )
    reference = jax.eval_shape(models.create("rednet26").init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert jax.tree.map(lambda v: v.shape, variables) == jax.tree.map(lambda v: v.shape, reference)


def test_unknown_op_switch_fails_at_construction():
    with pytest.raises(ValueError, match=r"cednet26: op_kwargs .*Unknown spatial op switch\(es\) contxt in op_kwargs; valid: kernel_size, context"):
        models.create("cednet26", op_kwargs=(("contxt", "none"),))


@pytest.mark.parametrize("name, op", [("resnet50", SpatialOp("conv", 3)), ("rednet26", SpatialOp("involution", 7)),
                                      ("cednet101", SpatialOp("cvolution", 7))])
def test_each_family_holds_its_op_as_one_spatial_op(name, op):
    assert models.create(name).op == op


def test_op_kwargs_change_the_families_op_and_keep_the_stem_at_3x3():
    model = models.create("cednet26", op_kwargs={"kernel_size": 5, "context": "none"})
    assert model.op == SpatialOp("cvolution", 5, context="none")
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    # C-volution's static kernel is [K*K, C]: K=5 in the bottlenecks (width 64 in stage 1), 3 in the stem (32 channels).
    assert params["layer1_0"]["conv2"]["static_kernel"].shape == (25, 64)
    assert params["stem_op"]["static_kernel"].shape == (9, 32)
    assert "context_conv" not in params["layer1_0"]["conv2"]["generator"]


def test_resnet_refuses_an_op_that_is_not_a_spatial_op():
    with pytest.raises(ValueError, match=r"ResNet: op must be a cvolution_jax.layers.SpatialOp .*got 'involution'"):
        models.ResNet(stage_sizes=(1, 1, 1, 1), op="involution")
