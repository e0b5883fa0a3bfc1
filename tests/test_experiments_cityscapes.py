"""experiments.cityscapes end to end on a tiny Cityscapes tree in the official layout: train a few
steps, checkpoint, evaluate (mIoU against a numpy oracle over the restored model's predictions),
pictures; and the five mmseg-named configs' sizes against the published table."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cvolution_jax import count
from cvolution_jax.data import cityscapes
from cvolution_jax.data.semantic_records import read_label
from cvolution_jax.tasks import segmentation
from cvolution_jax.tasks.segmentation import Segmentation
from cvolution_jax.train import checkpoint, loop
from experiments.configs import common
from tests.conftest import CONFIGS, ROOT, final_params, load_config, write_cityscapes
from tests.test_segmentation_metrics import oracle


def tiny_config(root):
    config = common.segmentation("resnet50", decode_head="uper")
    config.model.backbone_overrides = {"stage_sizes": (1, 1, 1, 1), "widths": (4, 8, 8, 16), "stem_width": 8}
    config.model.update(head_channels=8, aux_channels=8, pool_scales=(1, 2))
    config.data.update(data_dir=str(root), scale=(128, 64), crop_size=(32, 64), num_workers=0, num_threads=1)
    config.batch_size = 2
    config.num_train_steps = 3
    config.eval_every_steps = 3
    config.log_every_steps = 3
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    write_cityscapes(root, "train", {"aachen": 2, "bremen": 2})
    write_cityscapes(root, "val", {"lindau": 2, "munster": 1})
    config = tiny_config(root)
    metrics = loop.train_and_evaluate(Segmentation(vis=2), config, str(root / "run"))
    return config, root, metrics


def test_training_writes_checkpoint_metrics_and_pictures(trained):
    config, root, metrics = trained
    workdir = root / "run"
    assert checkpoint.Checkpointer(str(workdir / "checkpoints")).all_steps() == [3]
    assert metrics["images"] == 3 and metrics["skipped_images"] == 0
    assert {f"IoU.{name}" for name in cityscapes.CLASSES} <= set(metrics)
    strict = lambda name: pytest.fail(f"bare {name} in metrics.jsonl")  # noqa: E731 -- strict JSON: null, never NaN
    records = [json.loads(line, parse_constant=strict) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    [evaluation] = [r for r in records if r["split"] == "eval"]
    for name in cityscapes.CLASSES:  # NaN (a class absent from labels and predictions) is written as null
        assert evaluation[f"IoU.{name}"] == (None if np.isnan(metrics[f"IoU.{name}"]) else pytest.approx(metrics[f"IoU.{name}"]))
    assert [r["step"] for r in train] == [3] and np.isfinite(train[0]["loss"]) and "aux" in train[0]
    pictures = sorted((workdir / "eval_3").glob("*.png"))
    assert len(pictures) == 2
    from PIL import Image

    assert Image.open(pictures[0]).size == (3 * 128, 64)  # image | ground truth | prediction


@pytest.mark.slow  # compiles the eval step again
def test_eval_mode_restores_the_same_numbers(trained):
    config, root, metrics = trained
    restored = loop.evaluate(Segmentation(), config, str(root / "run"))
    assert {k: restored[k] for k in ("mIoU", "mAcc", "aAcc", "images")} == {
        k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "images")}
    assert json.loads((root / "run" / "eval_3.json").read_text())["mIoU"] == metrics["mIoU"]


def test_eval_metrics_are_the_oracles_over_the_checkpointed_models_predictions(trained):
    config, root, metrics = trained
    params, batch_stats = final_params(str(root / "run"), 3)
    model = segmentation.create_model(config)
    records = cityscapes.find_records(str(root), "val")
    from PIL import Image

    from cvolution_jax.data import transforms

    images = np.stack([transforms.normalize(np.asarray(Image.open(r.image_path).convert("RGB")),
                                            transforms.IMAGENET_MEAN, transforms.IMAGENET_STD) for r in records])
    preds = np.asarray(jax.jit(lambda images: model.apply({"params": params, "batch_stats": batch_stats}, images,
                                                         (64, 128), method="predict"))(jnp.asarray(images)))
    labels = [read_label(record, 64, 128, 19) for record in records]
    want = oracle(preds, labels, 19)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert metrics[key] == pytest.approx(want[key], abs=1e-9), key
    for name, iou in zip(cityscapes.CLASSES, want["IoU"]):
        assert metrics[f"IoU.{name}"] == pytest.approx(iou, abs=1e-9, nan_ok=True), name


def test_a_bad_val_label_stops_the_run_before_its_first_step(tmp_path):
    """With the shipped recipes the first evaluation comes after 8000 steps: its errors are found first."""
    write_cityscapes(tmp_path, "train", {"aachen": 2})
    write_cityscapes(tmp_path, "val", {"lindau": 2}, train_ids_for=("lindau_000000_000001",))
    bad = tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000001_gtFine_labelTrainIds.png"
    Image.fromarray(np.full((64, 128), 19, np.uint8)).save(bad)  # 19 classes: ids 0..18, and 255
    with pytest.raises(ValueError, match=rf"{bad} holds 8192 pixels of class ids 19, outside this dataset's 19 classes"):
        loop.train_and_evaluate(Segmentation(), tiny_config(str(tmp_path)), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cityscapes_without_its_folders_names_the_data_dir_field(tmp_path):
    config = tiny_config(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="No Cityscapes images under .*nothing/leftImg8bit/val.*Set config.data.data_dir"):
        loop.train_and_evaluate(Segmentation(), config, str(tmp_path / "run"))


# Published (params M, GFLOPs) of the involution code's Cityscapes table; CedNet-50 has none.
PUBLISHED = {"fpn_rednet50": (18.5, 293.9), "fpn_rednet50_neck": (16.4, 205.2), "upernet_rednet50": (56.4, 1825.6)}
with open(f"{ROOT}/docs/segmentation.md") as f:
    SEGMENTATION_PAGE = f.read()
SEGMENTATION_CONFIGS = [c for c in CONFIGS if c.endswith("_512x1024_80k_cityscapes.py")]


def test_the_five_mmseg_named_configs_exist():
    names = sorted(c.rsplit("/", 1)[1][: -len("_512x1024_80k_cityscapes.py")] for c in SEGMENTATION_CONFIGS)
    assert names == ["fpn_cednet50", "fpn_rednet50", "fpn_rednet50_neck", "upernet_cednet50", "upernet_rednet50"]


def counted(name: str) -> dict:
    """`python -m cvolution_jax.count --config` of the config `name` (e.g. "fpn_rednet50")."""
    return count.count_config(load_config(next(c for c in SEGMENTATION_CONFIGS if c.rsplit("/", 1)[1].startswith(name + "_512"))))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_have_the_tables_parameters_and_flops(name):
    """Parameters of every head (the auxiliary one too, as mmseg counts the whole model); MACs
    at 2048x1024 of the test-time network, which mmseg's `get_flops` (`forward_dummy`) runs
    without the auxiliary head."""
    result = counted(name)
    assert (result["input"], result["classes"]) == ("1024x2048", 19)
    assert result["params"] / 1e6 == pytest.approx(PUBLISHED[name][0], rel=0.02)
    assert result["macs"] / 1e9 == pytest.approx(PUBLISHED[name][1], rel=0.02)


def test_upernet_params_include_the_auxiliary_head_macs_do_not():
    """FCNHead on C4 (1024 channels of RedNet-50): a 3x3 conv to `aux_channels` (no bias) + BN, and a
    1x1 classifier with bias; mmseg's UPerNet config sets concat_input=False and one conv."""
    with_aux, config = counted("upernet_rednet50"), load_config(next(c for c in SEGMENTATION_CONFIGS if "upernet_rednet50" in c))
    config.model.aux_weight = 0.0
    without = count.count_config(config)
    aux = config.model.aux_channels
    assert with_aux["params"] - without["params"] == 9 * 1024 * aux + 2 * aux + aux * 19 + 19
    assert with_aux["macs"] == without["macs"]


@pytest.mark.parametrize("name", ["fpn_rednet50", "fpn_rednet50_neck", "fpn_cednet50", "upernet_rednet50", "upernet_cednet50"])
def test_the_segmentation_page_table_is_what_count_prints(name):
    row = next(line for line in SEGMENTATION_PAGE.splitlines() if line.startswith(f"| `{name}_512x1024_80k_cityscapes` |"))
    params_m, macs_g = (float(cell) for cell in row.split("|")[2:4])
    result = counted(name)
    assert (round(result["params"] / 1e6, 2), round(result["macs"] / 1e9, 1)) == (params_m, macs_g)
