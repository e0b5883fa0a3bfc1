"""Training library: optimizer recipe, loss, checkpoints, and the loop run in-process."""

import json
import math
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cvolution_jax import data, models
from cvolution_jax.tasks import classification
from cvolution_jax.tasks.classification import Classification
from cvolution_jax.train import checkpoint, loop, optim, steps
from tests import tiny_config as tiny


def tiny_config(**changes) -> ml_collections.ConfigDict:
    config = tiny.get_config()
    for key, value in changes.items():
        config[key] = value
    return config


def test_learning_rate_schedule_is_warmup_then_cosine():
    config = ml_collections.ConfigDict(dict(base_lr=0.1, batch_size=2048, warmup_epochs=5.0, warmup_factor=0.25))
    steps_per_epoch, total = 626, 130 * 626
    schedule = classification.learning_rate_schedule(config, steps_per_epoch, total)
    warmup = 5 * 626
    assert math.isclose(schedule(0), 0.2, rel_tol=1e-6)  # 0.25 x 0.8
    assert math.isclose(schedule(warmup // 2), 0.2 + 0.6 * (warmup // 2) / warmup, rel_tol=1e-5)
    assert math.isclose(schedule(warmup), 0.8, rel_tol=1e-6)
    middle = warmup + (total - warmup) // 2
    assert math.isclose(schedule(middle), 0.4, rel_tol=1e-3)
    assert abs(schedule(total)) < 1e-9


def test_weight_decay_skips_batchnorm_and_biases():
    variables = jax.eval_shape(models.create("cednet26").init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(classification.decay_mask(variables["params"]))[0]}
    assert flat["['stem_conv1']['kernel']"] and flat["['fc']['kernel']"]
    assert flat["['layer1_0']['conv2']['static_kernel']"]
    assert not flat["['fc']['bias']"] and not flat["['layer1_0']['bn1']['scale']"] and not flat["['layer1_0']['bn1']['bias']"]
    assert not flat["['layer1_0']['conv2']['generator']['span_conv']['bias']"]


def two_steps(tx: optax.GradientTransformation, grads: dict, params: dict | None = None) -> dict:
    """`params` (default: a kernel [[1, -2]] and a bias [0.5]) after two updates of `tx` with the same `grads`."""
    params = params or {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
    opt_state = tx.init(params)
    for _ in range(2):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


def torch_nesterov_steps(p, grad, lrs, weight_decay):
    """`p` after one torch.optim.SGD step per lr (momentum 0.9, Nesterov, weight decay added to the gradient)."""
    p, buf = np.asarray(p, np.float64), 0.0
    for lr in lrs:
        g = np.asarray(grad) + weight_decay * p
        buf = 0.9 * buf + g
        p = p - lr * (g + 0.9 * buf)
    return p


# The classification recipe's optimizer fields, no warm-up: lr(0) = 0.1, lr(1) = 0.1*(1+cos(pi/1000))/2.
SGD_FIELDS = dict(base_lr=0.1, batch_size=256, warmup_epochs=0.0, warmup_factor=1.0, weight_decay=0.01, momentum=0.9, nesterov=True)
SGD_LRS = [0.1, 0.1 * (1 + math.cos(math.pi * 1 / 1000)) / 2]


def test_sgd_step_matches_pytorch_update_rule():
    """One step of the optimizer against torch.optim.SGD's formulas written out (nesterov, wd in grad)."""
    config = ml_collections.ConfigDict(dict(SGD_FIELDS, static_kernel_lr_mult=1.0))
    tx = classification.create_optimizer(config, steps_per_epoch=10, total_steps=1000)
    params = two_steps(tx, {"kernel": jnp.array([[0.3, 0.1]]), "bias": jnp.array([0.2])})
    np.testing.assert_allclose(params["kernel"][0], torch_nesterov_steps([1.0, -2.0], [0.3, 0.1], SGD_LRS, 0.01), rtol=1e-6)
    np.testing.assert_allclose(params["bias"], torch_nesterov_steps([0.5], [0.2], SGD_LRS, 0.0), rtol=1e-6)


def test_static_kernel_lr_mult_scales_only_the_static_kernels_steps():
    """With `static_kernel_lr_mult` 0.1, S moves 0.1x as far over two Nesterov steps with decay
    (its lr scaled: momentum and decay are linear in the step); every other parameter as with 1."""
    start = {"conv2": {"static_kernel": jnp.array([[1.0, -2.0]]), "kernel": jnp.array([[1.0, -2.0]])}, "bias": jnp.array([0.5])}
    grads = {"conv2": {"static_kernel": jnp.array([[0.3, 0.1]]), "kernel": jnp.array([[0.3, 0.1]])}, "bias": jnp.array([0.2])}
    ends = {}
    for mult in (1.0, 0.1):
        tx = classification.create_optimizer(ml_collections.ConfigDict(dict(SGD_FIELDS, static_kernel_lr_mult=mult)), 10, 1000)
        ends[mult] = two_steps(tx, grads, start)
    # S's own decay sees S's own (smaller) first step: torch's rule at 0.1x the lr.
    expected = torch_nesterov_steps([1.0, -2.0], [0.3, 0.1], [0.1 * lr for lr in SGD_LRS], 0.01)
    np.testing.assert_allclose(ends[0.1]["conv2"]["static_kernel"][0], expected, rtol=1e-6)
    np.testing.assert_allclose(ends[0.1]["conv2"]["kernel"], ends[1.0]["conv2"]["kernel"], rtol=0)
    np.testing.assert_allclose(ends[0.1]["bias"], ends[1.0]["bias"], rtol=0)


def test_sgd_clips_the_raw_gradients_then_decays_the_masked_parameters():
    """`optim.sgd` with mmdet's grad_clip: the raw gradients' global norm (5 here) is clipped to 0.5
    before weight decay enters; the bias is masked out of the decay; plain (not Nesterov) momentum."""
    tx = optim.sgd(0.1, momentum=0.9, weight_decay=0.01, grad_clip_norm=0.5, decay_mask={"kernel": True, "bias": False})
    params = two_steps(tx, {"kernel": jnp.array([[3.0, 0.0]]), "bias": jnp.array([4.0])})
    p, buf, b, bbuf = np.array([1.0, -2.0]), np.zeros(2), np.array([0.5]), np.zeros(1)
    for _ in range(2):
        g = np.array([3.0, 0.0]) * 0.5 / 5 + 0.01 * p
        buf = 0.9 * buf + g
        p = p - 0.1 * buf
        bbuf = 0.9 * bbuf + np.array([4.0]) * 0.5 / 5
        b = b - 0.1 * bbuf
    np.testing.assert_allclose(params["kernel"][0], p, rtol=1e-6)
    np.testing.assert_allclose(params["bias"], b, rtol=1e-6)


def test_weighted_cross_entropy_closed_form():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]])
    labels = jnp.array([0, 2, 1])
    mask = jnp.array([1.0, 1.0, 0.0])
    eps = 0.1
    log_p = np.asarray(jax.nn.log_softmax(logits))
    expected = np.mean([-(1 - eps) * log_p[i, labels[i]] - eps / 3 * log_p[i].sum() for i in (0, 1)])
    assert math.isclose(float(classification.weighted_cross_entropy(logits, labels, mask, eps)), expected, rel_tol=1e-6)


@pytest.mark.slow  # 20 s; test_experiments_coco checks the same error on the backbone path
def test_restoring_into_a_different_model_names_the_parameter(tmp_path):
    tx = optax.sgd(0.1)
    small = steps.create_train_state(models.create("rednet26", num_classes=10, widths=(16, 16, 16, 16)), tx, (32, 32, 3), jax.random.key(0))
    wide = steps.create_train_state(models.create("rednet26", num_classes=10, widths=(16, 32, 16, 16)), tx, (32, 32, 3), jax.random.key(0))
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    assert [next(data) for _ in range(3)] == [0, 1, 2]
    ckpt.save(1, small, data)
    ckpt.wait()
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/layer2_0/bn1/bias has shape \(16,\) in the checkpoint but \(32,\)"):
        ckpt.restore(wide)
    fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
    restored = ckpt.restore(small, data_iterator=fresh)
    assert next(fresh) == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(small)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at step 7 .*steps there: \[1\]"):
        ckpt.restore(small, step=7)
    ckpt.close()


def test_train_evaluate_and_restore(tmp_path):
    workdir = str(tmp_path)
    config = tiny_config()
    final = loop.train_and_evaluate(Classification(), config, workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "eval"] == [6, 12]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert os.path.exists(os.path.join(workdir, "curves.png"))
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["name"] == "cednet26"
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps())[-1] == 12
    # Eval mode restores the final checkpoint and reproduces the final evaluation; its config goes
    # beside the training one, which stays.
    trained_with = open(os.path.join(workdir, "config.json")).read()
    eval_config = tiny_config(mode="eval")
    metrics = loop.evaluate(Classification(), eval_config, workdir)
    for key in ("top1", "top5", "loss"):
        assert math.isclose(metrics[key], final[key], rel_tol=1e-6)
    assert json.load(open(os.path.join(workdir, "eval_12.json")))["step"] == 12
    assert open(os.path.join(workdir, "config.json")).read() == trained_with
    assert json.load(open(os.path.join(workdir, "config_eval_12.json")))["mode"] == "eval"


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    loop.train_and_evaluate(Classification(), tiny_config(num_train_steps=4), workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    before = checkpoint.Checkpointer(ckpt_dir).all_steps()
    assert before[-1] == 4
    with pytest.raises(loop.DivergedError, match=r"(Training loss|The parameters' norm) is (nan|inf).*last good checkpoint \(step 4\) is intact"):
        loop.train_and_evaluate(Classification(), tiny_config(num_train_steps=12, base_lr=1e30), workdir)
    assert checkpoint.Checkpointer(ckpt_dir).all_steps() == before


def test_bfloat16_training_runs_with_float32_parameters(tmp_path):
    config = tiny_config(dtype="bfloat16", num_train_steps=3, eval_every_steps=3)
    final = loop.train_and_evaluate(Classification(), config, str(tmp_path))
    assert math.isfinite(final["loss"])
    # The reported top-1 against one recomputed here: the final checkpoint's variables applied to
    # every eval example (valid-0 padding dropped), argmax and count in numpy.
    variables = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).restore_variables(3)
    eval_split = data.create_split(config.data, train=False, batch_size=config.batch_size, seed=config.seed)
    model = models.create(config.model.name, num_classes=eval_split.num_classes, dtype=jnp.bfloat16, **config.model.overrides)
    apply = jax.jit(lambda images: model.apply(variables, images, train=False))
    correct = examples = 0
    for batch in eval_split.dataset:
        real = np.asarray(batch["valid"]) > 0
        predicted = np.asarray(apply(batch["image"])).argmax(-1)
        correct += int((predicted == np.asarray(batch["label"]))[real].sum())
        examples += int(real.sum())
    assert examples == eval_split.num_examples
    assert math.isclose(final["top1"], correct / examples, abs_tol=0.5 / examples)
    restored = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).manager.item_metadata(3)["state"]
    assert {str(m.dtype) for m in jax.tree.leaves(restored["params"])} == {"float32"}
