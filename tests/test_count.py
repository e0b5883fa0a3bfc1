"""`python -m cvolution_jax.count`: the spec's parameter and MAC requirements and the CLI."""

import functools
import json
import math
import os
import re

import flax.linen as nn
import pytest

from cvolution_jax import count, models
from tests.conftest import CONFIGS, ROOT

CONFIG_DIR = os.path.join(ROOT, "experiments", "configs")
with open(os.path.join(ROOT, "docs", "detection.md")) as f:
    DETECTION_PAGE = f.read()


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


# --------------------------------------------------------------------- a run's config: detectors


def documented_detector_rows() -> dict:
    """`{config (with its overrides): (params, MACs)}` of the Faster and Mask R-CNN tables in docs/detection.md."""
    rows = {}
    for line in DETECTION_PAGE.splitlines():
        match = re.match(r"\| `((?:faster|mask)_rcnn_\w+_1x\.py)((?: --config\.[\w.]+=\w+)*)` \|(.*)", line)
        if match:
            cells = [cell.strip() for cell in match.group(3).split("|")]
            first = 2 if match.group(1).startswith("faster") else 3  # the Mask R-CNN table adds its head op
            rows[match.group(1) + match.group(2)] = (float(cells[first]), float(cells[first + 1]))
    return rows


DOCUMENTED_ROWS = documented_detector_rows()


@functools.cache
def counted(row: str) -> dict:
    """`count` of a row of docs/detection.md: its config file with its overrides, as `--config` loads them."""
    path, *overrides = row.split(" ")
    return count.count_config(count.load_config(os.path.join(CONFIG_DIR, path), tuple(overrides)))


def test_the_detection_page_lists_every_detector_config():
    configs = {os.path.basename(p) for p in CONFIGS if os.path.basename(p).startswith(("faster_rcnn", "mask_rcnn"))}
    assert {row.split(" ")[0] for row in DOCUMENTED_ROWS} == configs
    assert "faster_rcnn_rednet50_fpn_1x.py --config.model.neck_op=cvolution" in DOCUMENTED_ROWS


@pytest.mark.parametrize("row", sorted(DOCUMENTED_ROWS))
def test_every_detector_config_counts_as_the_detection_page_says(row):
    result, (params_m, macs_g) = counted(row), DOCUMENTED_ROWS[row]
    assert (round(result["params"] / 1e6, 2), round(result["macs"] / 1e9, 1)) == (params_m, macs_g)
    assert (result["input"], result["classes"]) == ("800x1280", 80)


@pytest.mark.parametrize("row, published, tolerance", [
    ("faster_rcnn_resnet50_fpn_1x.py", 41.5e6, 0.01),  # mmdetection's model zoo
    ("faster_rcnn_rednet50_fpn_1x.py", 31.6e6, 0.02),  # the paper's table, convolution neck
    ("faster_rcnn_rednet50_neck_fpn_1x.py", 29.5e6, 0.02),  # involution neck
    ("faster_rcnn_rednet50_fpn_1x.py --config.model.neck_op=cvolution", 29.8e6, 0.02),  # the paper's "CedNet-50-FPN" row
    ("mask_rcnn_resnet50_fpn_1x.py", 44.2e6, 0.02),  # the paper's table: RedNet-50's 34.2M is 22.6% below it
    ("mask_rcnn_rednet50_fpn_1x.py", 34.2e6, 0.02),
    ("mask_rcnn_rednet50_neck_fpn_1x.py", 32.2e6, 0.02),
    ("mask_rcnn_cednet50_fpn_1x.py", 33.4e6, 0.02),
])
def test_detector_parameters_match_the_published_counts(row, published, tolerance):
    params = counted(row)["params"]
    assert abs(params - published) <= tolerance * published, params


def test_cednet50_detector_is_the_paper_row_plus_the_cednet_backbone():
    """The paper's 29.8M CedNet-50-FPN row is a RedNet-50 backbone with a C-volution neck; a real
    CedNet-50 backbone adds exactly its extra parameters over RedNet-50 (docs/detection.md)."""
    backbone = lambda name: count.count(models.create(name))["params"]  # noqa: E731
    paper_row = counted("faster_rcnn_rednet50_fpn_1x.py --config.model.neck_op=cvolution")["params"]
    assert counted("faster_rcnn_cednet50_fpn_1x.py")["params"] - paper_row == backbone("cednet50") - backbone("rednet50")


def test_mask_head_adds_its_closed_form_parameters_and_macs():
    """mmdet's FCNMaskHead with 80 classes: 4 conv 3x3 (256 -> 256, bias), a 2x2 stride-2 deconv, a
    1x1 conv to 80 maps, run on the 100 detections at 14x14 (28x28 after the deconv)."""
    faster, mask = counted("faster_rcnn_resnet50_fpn_1x.py"), counted("mask_rcnn_resnet50_fpn_1x.py")
    assert mask["params"] - faster["params"] == 4 * (256 * 256 * 9 + 256) + (2 * 2 * 256 * 256 + 256) + (256 * 80 + 80)
    per_roi = 4 * 14 * 14 * 256 * 256 * 9 + 14 * 14 * 2 * 2 * 256 * 256 + 28 * 28 * 256 * 80
    assert mask["macs"] - faster["macs"] == 100 * per_roi


def test_a_cvolution_neck_replaces_the_fpn_convolutions_by_their_closed_form():
    """The neck override swaps each of the FPN's four 3x3 output convolutions (256 -> 256, bias) for a
    C-volution on 256 channels: reduce 1x1 (256 -> 64) + BN, dilated 3x3 context (64 -> 64) + BN, span
    1x1 (64 -> 16 groups x 49 taps, bias) and the channel branch's static kernel (49 x 256)."""
    conv = 256 * 256 * 9 + 256
    cvolution = (256 * 64 + 2 * 64) + (9 * 64 * 64 + 2 * 64) + (64 * 16 * 49 + 16 * 49) + 49 * 256
    change = counted("faster_rcnn_rednet50_fpn_1x.py --config.model.neck_op=cvolution")["params"] - counted(
        "faster_rcnn_rednet50_fpn_1x.py")["params"]
    assert change == 4 * (cvolution - conv)


# ------------------------------------------------------------------------------ a run's config: CLI


def test_cli_counts_a_config_with_its_overrides(capsys):
    count.main(["--config", os.path.join(CONFIG_DIR, "faster_rcnn_rednet50_fpn_1x.py"), "--config.model.neck_op=cvolution",
                "--json"])
    [row] = json.loads(capsys.readouterr().out)
    assert row["model"] == "faster_rcnn_rednet50_fpn_1x --config.model.neck_op=cvolution"
    assert (round(row["params"] / 1e6, 2), row["input"], row["classes"]) == (29.84, "800x1280", 80)


def test_a_classification_config_is_counted_by_the_classification_builder():
    config = count.load_config(os.path.join(CONFIG_DIR, "cednet50.py"))
    assert count.task_count(config) is count.COUNTS["classification"]
    result = count.count_config(config)
    # The model zoo's row (docs/zoo.md) for cednet50 (16.44M, 2.77G at 224x224, 1000 classes).
    assert (round(result["params"] / 1e6, 2), round(result["macs"] / 1e9, 2)) == (16.44, 2.77)
    assert (result["input"], result["classes"]) == ("224x224", 1000)


@pytest.mark.parametrize("args, message", [
    (["--config.model.neck_op=cvolution"], r"--config.model.neck_op=cvolution overrides a field of a config: give the file too"),
    (["--config", "CONFIG", "--config.model.neck_op", "cvolution"], r"--config.model.neck_op has no value: write the override as --config.model.neck_op=VALUE"),
    (["--config", "CONFIG", "--config.model.nek_op=cvolution"], r"--config.model.nek_op=cvolution: \S+ has no such field .*Did you mean \"neck_op\""),
    (["--config", "CONFIG", "--config.model.channels=wide"], r"--config.model.channels=wide: invalid literal for int"),
    (["--config", "CONFIG", "--config.model.neck_op=deformable"], r"spatial op must be one of \('conv', 'involution', 'cvolution'\); got 'deformable'"),
    (["--config", "no/such/config.py"], r"--config no/such/config.py: no such file"),
    (["--config", "CONFIG", "--widht=3"], r"unrecognized arguments: --widht=3"),
])
def test_cli_refuses_bad_configs_and_overrides_in_one_line(capsys, args, message):
    path = os.path.join(CONFIG_DIR, "faster_rcnn_rednet50_fpn_1x.py")
    with pytest.raises(SystemExit) as exit_info:
        count.main([path if arg == "CONFIG" else arg for arg in args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_config_whose_model_names_no_task_is_refused(tmp_path, capsys):
    path = tmp_path / "segmenter.py"
    path.write_text("import ml_collections\n\ndef get_config():\n"
                    "    return ml_collections.ConfigDict({'model': {'segmentor': 'x', 'backbone': 'rednet50'}})\n")
    with pytest.raises(SystemExit):
        count.main(["--config", str(path)])
    err = capsys.readouterr().err
    assert (f"{path}: This config names no task (config.task), and its model (backbone, segmentor) is none of a saved "
            f"run's: give the config of a training run (experiments/configs/), whose config.task is one of "
            f"classification, detection, segmentation.") in err
