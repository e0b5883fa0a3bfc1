"""The segmentation task's own parts: mmcv's poly schedule, mmseg's SGD, and config checks that
fail before anything is built."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cvolution_jax.tasks import segmentation
from cvolution_jax.train.config_checks import ConfigError
from experiments.configs import common, segmentation_default


def test_poly_schedule_is_mmcvs_formula_per_iteration():
    config = ml_collections.ConfigDict(dict(base_lr=0.01, min_lr=1e-4, lr_power=0.9))
    schedule = segmentation.learning_rate_schedule(config, 80000)
    for step in (0, 1, 8000, 40000, 79999, 80000):
        want = (0.01 - 1e-4) * (1 - step / 80000) ** 0.9 + 1e-4  # mmcv's PolyLrUpdaterHook
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5), step


def test_sgd_decays_every_parameter_before_momentum():
    config = ml_collections.ConfigDict(dict(base_lr=0.01, min_lr=0.01, lr_power=0.9, momentum=0.9, weight_decay=5e-4))
    tx = segmentation.create_optimizer(config, 10)
    params = {"bn": {"scale": jnp.asarray([2.0])}, "conv": {"kernel": jnp.ones((1, 1, 1, 1))}}
    grads = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    # torch SGD: d = g + wd * p; buf = d; p -= lr * buf (BatchNorm too: mmseg has no paramwise_cfg).
    np.testing.assert_allclose(np.asarray(updates["bn"]["scale"]), [-0.01 * 5e-4 * 2.0], rtol=1e-6)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(np.asarray(updates["conv"]["kernel"]).ravel(), [-0.01 * 5e-4 * 1.9], rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("data.name", "ade20k", "config.data.name must be one of cityscapes, shapes, nuclei for segmentation; got 'ade20k'"),
    ("data.crop_size", (512,), r"config.data.crop_size must be two positive ints; got \(512,\)"),
    ("data.ratio_range", (2.0, 0.5), r"config.data.ratio_range must be \(low, high\) with 0 < low <= high"),
    ("model.decode_head", "psp", r"config.model.decode_head must be one of \('fpn', 'uper'\)"),
    ("model.channels", 40, "config.model.channels must be a multiple of 16 with neck_op='cvolution'"),
])
def test_bad_fields_are_named_before_anything_is_built(field, value, message, tmp_path):
    config = segmentation_default.get_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        segmentation.check_segmentation(config, str(tmp_path), train=True)


def test_create_model_takes_the_datasets_classes_and_the_configs_heads():
    model = segmentation.create_model(common.segmentation("rednet50", "uper"))
    assert model.decode_head.num_classes == 19 and model.auxiliary_head.num_classes == 19
    assert model.neck is None and model.aux_weight == 0.4
    fpn = segmentation.create_model(segmentation_default.get_config())
    assert fpn.decode_head.num_classes == 4 and fpn.auxiliary_head is None and fpn.neck.num_outs == 4
    assert fpn.neck.op.kind == "cvolution"
