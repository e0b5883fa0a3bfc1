"""`python -m cvolution_jax.count`: the spec's parameter and MAC requirements and the CLI."""

import json
import math

import flax.linen as nn
import pytest

from cvolution_jax import count, models


@pytest.fixture(scope="module")
def counts():
    return {name: count.count(models.create(name)) for name in ["resnet50", "rednet38", "rednet50", "rednet101", "cednet50"]}


@pytest.mark.parametrize("name,params_m", [("resnet50", 25.56), ("rednet38", 12.39), ("rednet50", 15.54), ("rednet101", 25.65)])
def test_params_match_reference_networks(counts, name, params_m):
    assert abs(counts[name]["params"] / 1e6 - params_m) <= 0.01


def test_cednet50_params_within_one_percent_of_paper(counts):
    assert abs(counts["cednet50"]["params"] / 16.3e6 - 1) <= 0.01


@pytest.mark.parametrize("name,macs_g,tolerance", [("resnet50", 4.1, 0.02), ("rednet50", 2.71, 0.03)])
def test_macs_match_published(counts, name, macs_g, tolerance):
    assert abs(counts[name]["macs"] / (macs_g * 1e9) - 1) <= tolerance


def test_macs_of_single_layers_match_closed_forms():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), strides=2, padding=1, feature_group_count=1)(x)  # 5*5*8 * 3*3*4
            x = nn.Conv(8, (3, 3), padding=1, feature_group_count=8)(x)  # 5*5*8 * 3*3*1
            return nn.Dense(6)(x.reshape(x.shape[0], -1))  # 200 * 6

    result = count.count(Net(), image_size=9)
    # Net takes 3 input channels: the first conv's kernel is [3, 3, 3, 8].
    assert result["macs"] == 25 * 8 * 27 + 25 * 8 * 9 + 200 * 6
    assert result["params"] == (27 * 8 + 8) + (9 * 8 + 8) + (200 * 6 + 6)


def test_aggregation_macs_are_output_size_times_taps():
    from cvolution_jax.layers import Involution

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(16, (1, 1))(x)  # 10*10 * 16*3
            return Involution(16, 7, stride=2)(x)  # generator: 5*5*(16*4 + 4*49); aggregation 5*5*16*49

    assert count.count(Net(), image_size=10)["macs"] == 100 * 48 + 25 * (16 * 4 + 4 * 49) + 25 * 16 * 49


def test_cli_json(capsys):
    count.main(["rednet26", "cednet26", "--json", "--image-size", "224"])
    rows = json.loads(capsys.readouterr().out)
    assert [row["model"] for row in rows] == ["rednet26", "cednet26"]
    assert round(rows[0]["params"] / 1e6, 2) == 9.23 and round(rows[1]["params"] / 1e6, 2) == 9.64
    assert math.isclose(rows[1]["macs"] - rows[0]["macs"], 0.06e9, rel_tol=0.1)


def test_cli_rejects_unknown_model(capsys):
    with pytest.raises(SystemExit):
        count.main(["resnet18"])
    assert "unknown model(s) resnet18; valid names: resnet50" in capsys.readouterr().err


@pytest.mark.parametrize("name, published, tolerance", [
    ("faster_rcnn_resnet50_fpn", 41.5e6, 0.01),  # mmdetection's model zoo
    ("faster_rcnn_rednet50_fpn", 31.6e6, 0.02),  # the paper's table, convolution neck
    ("faster_rcnn_rednet50_neck_fpn", 29.5e6, 0.02),  # involution neck
    ("faster_rcnn_rednet50_cvolution_neck_fpn", 29.8e6, 0.02),  # the paper's "CedNet-50-FPN" row
])
def test_detector_parameters_match_the_published_counts(name, published, tolerance):
    params = count.count(count.create_detector(name), count.DETECTOR_IMAGE)["params"]
    assert abs(params - published) <= tolerance * published, params


def test_cednet50_detector_is_the_seed_row_plus_the_cednet_backbone():
    """The paper's 29.8M CedNet-50-FPN row is a RedNet-50 backbone with a C-volution neck; a real
    CedNet-50 backbone adds exactly its extra parameters over RedNet-50 (README)."""
    detector = lambda name: count.count(count.create_detector(name), count.DETECTOR_IMAGE)["params"]  # noqa: E731
    backbone = lambda name: count.count(models.create(name))["params"]  # noqa: E731
    assert detector("faster_rcnn_cednet50_fpn") - detector("faster_rcnn_rednet50_cvolution_neck_fpn") == (
        backbone("cednet50") - backbone("rednet50"))


@pytest.mark.parametrize("name, published", [
    ("mask_rcnn_resnet50_fpn", 44.2e6),  # the paper's table: RedNet-50's 34.2M is 22.6% below it
    ("mask_rcnn_rednet50_fpn", 34.2e6),
    ("mask_rcnn_rednet50_neck_fpn", 32.2e6),
    ("mask_rcnn_cednet50_fpn", 33.4e6),
])
def test_mask_rcnn_parameters_match_the_seed_table(name, published):
    params = count.count(count.create_detector(name), count.DETECTOR_IMAGE)["params"]
    assert abs(params - published) <= 0.02 * published, params


def test_mask_head_adds_its_closed_form_parameters_and_macs():
    """mmdet's FCNMaskHead with 80 classes: 4 conv 3x3 (256 -> 256, bias), a 2x2 stride-2 deconv, a
    1x1 conv to 80 maps, run on the 100 detections at 14x14 (28x28 after the deconv)."""
    faster = count.count(count.create_detector("faster_rcnn_resnet50_fpn"), count.DETECTOR_IMAGE)
    mask = count.count(count.create_detector("mask_rcnn_resnet50_fpn"), count.DETECTOR_IMAGE)
    assert mask["params"] - faster["params"] == 4 * (256 * 256 * 9 + 256) + (2 * 2 * 256 * 256 + 256) + (256 * 80 + 80)
    per_roi = 4 * 14 * 14 * 256 * 256 * 9 + 14 * 14 * 2 * 2 * 256 * 256 + 28 * 28 * 256 * 80
    assert mask["macs"] - faster["macs"] == 100 * per_roi
