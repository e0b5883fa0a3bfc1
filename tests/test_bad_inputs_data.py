"""Damaged inputs never stop a run: undecodable eval images, malformed COCO segmentations,
empty class folders and empty annotation files, each skipped and counted or refused clearly."""

import dataclasses
import io
import json
import logging
import os
import re
import types
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cvolution_jax import data
from cvolution_jax.data import coco, coco_transforms, imagenet, masks, registry
from cvolution_jax.detection import evaluation
from cvolution_jax.tasks import classification
from cvolution_jax.tasks import detection as detection_task
from cvolution_jax.train import checkpoint, loop
from experiments.configs import coco_default
from tests import tiny_config as tiny
from tests.conftest import CATEGORIES, annotation, coco_stream, take, write_coco


def _truncated_jpeg(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])


# ------------------------------------------------------------ classification: a damaged val image


def _image_tree(root, *, truncated_val=None):
    """root/{train,val}/<class>/: 3 classes x 2 noisy 20x20 JPEGs each (val: other seeds), and
    optionally one truncated val JPEG `truncated_val` = (class, name)."""
    for split, offset in (("train", 0), ("val", 100)):
        for label in range(3):
            folder = root / split / f"n0{label}"
            folder.mkdir(parents=True)
            for i in range(2):
                rng = np.random.default_rng(offset + 10 * label + i)
                # A class colour plus noise: the model's outputs differ between images.
                pixels = np.clip(rng.normal(60 + 60 * label, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=95)
    if truncated_val is not None:
        label, name = truncated_val
        _truncated_jpeg(root / "val" / f"n0{label}" / name, seed=7)


def _classification_config(data_dir):
    config = tiny.get_config()
    # A one-block ResNet: the test is about the eval pass, and plain convolutions compile fastest.
    config.model.name = "resnet50"
    config.model.overrides = {"stem": "small", "stem_width": 8, "widths": (8,), "stage_sizes": (1,)}
    config.data.update(name="imagenet", source="imagefolder", data_dir=str(data_dir), image_size=16, num_threads=1)
    config.batch_size = 4
    config.num_train_steps = 2
    config.eval_every_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    return config


@flax.struct.dataclass
class _LinearState:
    """A stand-in for a train state: logits = first image row @ w, so numpy can recompute them."""

    apply_fn: Any = flax.struct.field(pytree_node=False)
    params: dict
    batch_stats: dict


def _linear(variables, images, train):
    return images[:, 0].reshape(images.shape[0], -1) @ variables["params"]["w"]


def _reference_metrics(logits, labels):
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    rank = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(-1)  # classes scored above the label
    return {
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "top1": float(np.mean(rank == 0)),
        "top5": float(np.mean(rank < 5)),
    }


def _decodable_val(val_root):
    """Images [n, 16, 16, 3] and labels [n] of the val files that decode, preprocessed one by one."""
    preprocess = imagenet.Preprocess(16)
    images, labels = [], []
    for label in range(3):
        folder = os.path.join(val_root, f"n0{label}")
        for name in sorted(os.listdir(folder)):
            if name != "cut.JPEG":
                path = os.path.join(folder, name)
                images.append(preprocess((path, path, label), None)["image"])
                labels.append(label)
    return np.stack(images), np.asarray(labels)


def test_eval_skips_a_truncated_val_image_counts_it_and_averages_over_the_rest(tmp_path, capsys):
    _image_tree(tmp_path, truncated_val=(1, "cut.JPEG"))
    cfg = data.default_config()
    cfg.update(name="imagenet", source="imagefolder", data_dir=str(tmp_path), image_size=16, num_threads=1)
    # 7 val files, 6 decodable: batches of 4 hold the truncated file and one padding slot.
    split = data.create_split(cfg, train=False, batch_size=4, seed=0, process_index=0, process_count=1)
    # Twelve outputs over three labels, so top-5 is not trivially 1.
    w = np.random.default_rng(0).normal(size=(16 * 3, 12)).astype(np.float32)
    state = _LinearState(_linear, {"w": jnp.asarray(w)}, {})
    metrics = classification.run_eval(state, split, loop.DataMesh(4), jax.jit(classification.eval_step))
    images, labels = _decodable_val(str(tmp_path / "val"))
    expected = _reference_metrics(images[:, 0].reshape(6, -1).astype(np.float64) @ w, labels)
    assert 0 < expected["top5"] < 1
    assert metrics["images"] == 6 and metrics["skipped_images"] == 1
    for key in ("loss", "top1", "top5"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
    assert "Evaluated 6 of 7 images of the eval split: 1 could not be decoded" in capsys.readouterr().out


@pytest.mark.slow  # about a minute on 2 busy CPU cores (three compilations); the fast test above checks the numbers
def test_training_and_eval_mode_get_past_a_truncated_val_image(tmp_path):
    _image_tree(tmp_path / "data", truncated_val=(1, "cut.JPEG"))
    config = _classification_config(tmp_path / "data")
    workdir = str(tmp_path / "run")
    final = loop.train_and_evaluate(classification.Classification(), config, workdir)  # evaluates at step 2, then checkpoints it
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2]
    variables = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).restore_variables()
    images, labels = _decodable_val(str(tmp_path / "data" / "val"))
    logits = classification.create_model(config, num_classes=3).apply(variables, jnp.asarray(images), train=False)
    expected = _reference_metrics(logits, labels)
    assert final["images"] == 6 and final["skipped_images"] == 1
    for key in ("loss", "top1", "top5"):
        assert final[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    # Eval mode (--config.mode=eval) gets past it too, with the same numbers.
    evaluated = loop.evaluate(classification.Classification(), config, workdir)
    for key in ("loss", "top1", "top5", "images", "skipped_images"):
        assert evaluated[key] == pytest.approx(final[key], rel=1e-6), key
    saved = json.load(open(os.path.join(workdir, "eval_2.json")))
    assert saved["images"] == 6 and saved["skipped_images"] == 1


# ------------------------------------------------------------ ImageFolder: empty class folders


def test_an_empty_train_class_folder_is_an_error_naming_it(tmp_path):
    _image_tree(tmp_path)
    (tmp_path / "train" / "n03").mkdir()
    (tmp_path / "train" / "n03" / "notes.txt").write_text("not an image")
    cfg = data.default_config()
    cfg.update(name="imagenet", source="imagefolder", data_dir=str(tmp_path), image_size=16)
    with pytest.raises(ValueError, match=r"Class folder .*train/n03 holds no images.*remove the folder"):
        data.create_split(cfg, train=True, batch_size=2, seed=0, process_index=0, process_count=1)


def test_an_empty_val_class_folder_is_a_warning_and_the_rest_evaluates(tmp_path, caplog):
    _image_tree(tmp_path)
    for name in os.listdir(tmp_path / "val" / "n02"):
        os.remove(tmp_path / "val" / "n02" / name)
    cfg = data.default_config()
    cfg.update(name="imagenet", source="imagefolder", data_dir=str(tmp_path), image_size=16)
    with caplog.at_level(logging.WARNING):
        split = data.create_split(cfg, train=False, batch_size=2, seed=0, process_index=0, process_count=1)
    assert (split.num_examples, split.num_classes) == (4, 3)
    assert "val/n02 holds no images" in caplog.text


# ------------------------------------------------------------ COCO: undecodable images


def _broken_png(image_dir, image_id):
    with open(os.path.join(image_dir, f"{image_id}.png"), "r+b") as f:
        f.truncate(30)  # the signature and part of the header survive


def test_coco_undecodable_image_is_an_invalid_slot_that_keeps_its_id(tmp_path, caplog):
    path, image_dir = write_coco(tmp_path, [(1, 8, 8), (2, 8, 8)], [annotation(1, 1, 7, [1, 1, 4, 4]),
                                                                    annotation(2, 2, 3, [2, 2, 4, 4])], CATEGORIES)
    _broken_png(image_dir, 2)
    dataset = coco.load_coco(path, image_dir)
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.data.coco_transforms"):
        batches = list(coco_stream(dataset, train=False, batch_size=3, scale=(8, 8), buckets=((8, 8),), max_gt=2))
        train = next(iter(coco_stream(dataset, train=True, batch_size=2, scale=(8, 8), buckets=((8, 8),), max_gt=2)))
    assert os.path.join(image_dir, "2.png") in caplog.text and "COCO image id 2" in caplog.text
    (batch,) = batches
    np.testing.assert_array_equal(batch["image_id"], [1, 2, -1])  # the third slot is padding
    np.testing.assert_array_equal(batch["valid"], [1, 0, 0])
    np.testing.assert_array_equal(batch["corrupt"], [0, 1, 0])
    assert not batch["image"][1].any() and not batch["gt_valid"][1].any()
    # Training goes on too: the damaged image is an invalid slot without ground truth.
    order = np.argsort(train["image_id"])
    np.testing.assert_array_equal(train["image_id"][order], [1, 2])
    np.testing.assert_array_equal(train["corrupt"][order], [0, 1])
    np.testing.assert_array_equal(train["gt_valid"][order].sum(1), [1, 0])


@flax.struct.dataclass
class _OracleState:
    """A 'detector' that finds exactly the one whole-image box each test image holds."""

    apply_fn: Any = flax.struct.field(pytree_node=False)
    params: dict
    batch_stats: dict


def _whole_image_box(variables, batch):
    size = batch["image_size"].astype(jnp.float32)  # [B, 2] (h, w)
    zeros = jnp.zeros_like(size[:, 0])
    boxes = jnp.stack([zeros, zeros, size[:, 1], size[:, 0]], axis=-1)[:, None]  # [B, 1, 4]
    count = boxes.shape[0]
    return {"boxes": boxes, "scores": jnp.ones((count, 1)), "labels": jnp.zeros((count, 1), jnp.int32),
            "valid": jnp.ones((count, 1), bool)}


def test_coco_eval_skips_an_undecodable_image_and_evaluates_the_rest(tmp_path, capsys):
    # Three 16x16 images, each one object of category 3 (label 0) covering it whole.
    images = [(1, 16, 16), (2, 16, 16), (3, 16, 16)]
    objects = [annotation(i, i, 3, [0, 0, 16, 16], area=256, iscrowd=0) for i in (1, 2, 3)]
    path, image_dir = write_coco(tmp_path, images, objects, CATEGORIES)
    _broken_png(image_dir, 2)
    config = coco_default.get_config()
    config.batch_size = 2
    config.model.detector = "faster_rcnn"
    config.data.update(scale=(16, 16), buckets=((16, 16),), max_gt=2, num_threads=1, num_workers=0)
    run = types.SimpleNamespace(
        config=config, mesh=loop.DataMesh(config.batch_size), eval_data=coco.load_coco(path, image_dir),
        model=types.SimpleNamespace(settings=types.SimpleNamespace(mask_threshold=0.5), with_mask=False),
    )
    metrics = detection_task.run_eval(run, _OracleState(_whole_image_box, {}, {}), str(tmp_path / "run"), step=1)
    # Over the two evaluated images every object is found at IoU 1: AP and AR are exactly 1. Had
    # the skipped image been counted, its object would be a miss and AR100 would be 2/3.
    assert metrics["AP"] == 1.0 and metrics["AR100"] == 1.0
    assert metrics["images"] == 2 and metrics["skipped_images"] == 1
    detections = json.loads((tmp_path / "run" / "eval_1" / "detections.json").read_text())
    assert sorted(d["image_id"] for d in detections) == [1, 3]
    assert re.search(r"Evaluated 2 of 3 images of \S+\.json: 1 could not be decoded", capsys.readouterr().out)


# ------------------------------------------------------------ COCO: malformed segmentations


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _segmentations():
    """(name, segmentation, valid) at 20 x 20."""
    square = np.zeros((20, 20), np.uint8)
    square[4:12, 4:12] = 1
    return [
        ("triangle", [[2.0, 2.0, 14.0, 2.0, 2.0, 14.0]], True),
        ("compressed RLE", _rle(square), True),
        ("uncompressed RLE", {"size": [20, 20], "counts": [84, 8, 308]}, True),
        ("two points", [[1.0, 1.0, 5.0, 5.0]], False),  # pycocotools would raise
        ("one point", [[1.0, 1.0]], False),
        ("no polygons", [], False),
        ("odd coordinates", [[1.0, 1.0, 5.0, 5.0, 9.0, 1.0, 4.0]], False),
        ("RLE of another size", _rle(np.zeros((20, 24))), False),
        ("garbage counts", {"size": [20, 20], "counts": "garbage~~"}, False),
        ("runs past the image", {"size": [20, 20], "counts": [50, 360]}, False),
        ("negative run", {"size": [20, 20], "counts": [410, -10]}, False),
        ("not a segmentation", "polygon", False),
    ]


def test_segmentation_error_accepts_coco_forms_and_names_what_is_wrong():
    for name, segmentation, valid in _segmentations():
        assert (masks.segmentation_error(segmentation, 20, 20) is None) == valid, name
    assert "differs from the image" in masks.segmentation_error(_rle(np.zeros((20, 24))), 20, 20)
    assert "at least 6" in masks.segmentation_error([[1.0, 1.0, 5.0, 5.0]], 20, 20)


def test_compressed_rle_runs_match_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(50):
        height, width = (int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random((height, width)) < rng.random()
        if trial % 5 == 0:
            mask[:] = trial % 10 == 0  # all background or all foreground: a zero first run
        rle = _rle(mask)
        assert masks.segmentation_error(rle, height, width) is None
        runs = masks._compressed_rle_counts(rle["counts"])
        # The runs alternate background/foreground over the column-major pixels.
        decoded = np.repeat(np.arange(len(runs)) % 2, runs).reshape(width, height).T
        np.testing.assert_array_equal(decoded, mask)
        np.testing.assert_array_equal(decoded, mask_utils.decode(rle))


def _segmentation_file(folder, valid_only=False):
    cases = [case for case in _segmentations() if case[2] or not valid_only]
    annotations = [annotation(k + 1, 1, 7 if k % 2 else 3, [1 + k % 5, 1, 10, 12], segmentation=segmentation)
                   for k, (_, segmentation, _) in enumerate(cases)]
    return write_coco(folder, [(1, 20, 20)], annotations, CATEGORIES), cases


def test_malformed_segmentations_are_counted_on_load_and_keep_their_boxes(tmp_path, caplog):
    (path, image_dir), cases = _segmentation_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.data.coco"):
        dataset = coco.load_coco(path, image_dir)
    (record,) = dataset.records
    assert dataset.invalid_segmentations == 9 and dataset.skipped == {}
    np.testing.assert_array_equal(record.segmentation_ok, [valid for _, _, valid in cases])
    assert len(record.labels) == len(cases)  # every box is still a target for box-only training
    assert "9 annotations have a malformed segmentation" in caplog.text and "annotations[3] (id 4)" in caplog.text


def test_mask_targets_leave_out_malformed_objects_as_if_absent(tmp_path):
    (path, image_dir), _ = _segmentation_file(tmp_path / "all")
    (clean_path, clean_dir), _ = _segmentation_file(tmp_path / "clean", valid_only=True)
    record = coco.load_coco(path, image_dir).records[0]
    clean = coco.load_coco(clean_path, clean_dir).records[0]
    preprocess = coco_transforms.Preprocess((20, 20), ((20, 20),), max_gt=12, flip_prob=1.0, mask_size=8)
    got = preprocess(record, np.random.default_rng(0))
    expected = preprocess(clean, np.random.default_rng(0))
    assert got["gt_valid"].sum() == 3
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # Box-only training keeps every box.
    assert coco_transforms.Preprocess((20, 20), ((20, 20),), max_gt=12)(record, None)["gt_valid"].sum() == 12


def test_a_mask_that_fails_to_decode_in_a_batch_skips_the_object_not_the_run(tmp_path, caplog):
    triangle = [[2.0, 2.0, 14.0, 2.0, 2.0, 14.0]]
    path, image_dir = write_coco(tmp_path, [(1, 20, 20), (2, 20, 20)], [
        annotation(1, 1, 3, [2, 2, 12, 12], segmentation=triangle),
        annotation(2, 1, 7, [5, 5, 10, 10], segmentation=[[1.0, 1.0]]),
        annotation(3, 2, 7, [1, 1, 8, 8], segmentation=triangle),
    ], CATEGORIES)
    dataset = coco.load_coco(path, image_dir)
    # A check that missed a bad mask: pycocotools itself then fails on it while the batch is built.
    first = dataclasses.replace(dataset.records[0], segmentation_ok=np.ones(2, bool))
    dataset = dataclasses.replace(dataset, records=(first, dataset.records[1]))
    stream = coco_stream(dataset, train=True, batch_size=2, scale=(20, 20), buckets=((20, 20),), max_gt=3, mask_size=8)
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.data.coco_transforms"):
        (batch,) = take(iter(stream), 1)
    row = int(np.flatnonzero(batch["image_id"] == 1)[0])
    np.testing.assert_array_equal(batch["gt_valid"][row], [True, False, False])
    np.testing.assert_array_equal(batch["boxes"][row, 0], [2, 2, 14, 14])
    assert "skipping object 1" in caplog.text


# ------------------------------------------------------------ COCO: no annotations


@pytest.mark.parametrize("annotations, why", [
    ([], "its annotation list is empty"),
    ([annotation(1, 1, 3, [1, 1, 4, 4], iscrowd=1), annotation(2, 1, 3, [1, 1, 0, 4])],
     r"all 2 annotations were skipped \(1 crowd, 1 non-positive box size\)"),
])
def test_training_on_a_file_without_usable_annotations_says_so(tmp_path, annotations, why):
    path, image_dir = write_coco(tmp_path, [(1, 8, 8), (2, 8, 8)], annotations, CATEGORIES)
    dataset = coco.load_coco(path, image_dir)
    with pytest.raises(ValueError, match=f"instances.json has no usable annotations for training: {why}"):
        coco_transforms.examples(dataset, train=True, scale=(8, 8), buckets=((8, 8),), max_gt=2)


def test_mask_training_on_a_file_without_a_wellformed_segmentation_says_so(tmp_path):
    path, image_dir = write_coco(tmp_path, [(1, 8, 8)], [annotation(1, 1, 3, [1, 1, 4, 4], segmentation=[[1, 1]])],
                                 CATEGORIES)
    dataset = coco.load_coco(path, image_dir)
    with pytest.raises(ValueError, match="none of its 1 usable annotations has a well-formed segmentation"):
        coco_transforms.examples(dataset, train=True, scale=(8, 8), buckets=((8, 8),), max_gt=2, mask_size=4)


def test_the_segm_ground_truth_check_refuses_what_pycocotools_cannot_read(tmp_path):
    """Oracle: `COCO.annToRLE`, what COCOeval calls on every ground truth, raises exactly on the
    polygons the check names; RLE whose runs do not cover the image (which pycocotools' C code
    would overrun, so it cannot be the oracle there) and a missing segmentation are named too."""
    from pycocotools.coco import COCO

    (path, image_dir), cases = _segmentation_file(tmp_path)
    content = json.loads(open(path).read())
    content["annotations"].append(annotation(len(cases) + 1, 1, 7, [2, 2, 5, 5], iscrowd=1,
                                             segmentation={"size": [20, 20], "counts": [50, 360]}))
    content["annotations"].append(annotation(len(cases) + 2, 1, 7, [2, 2, 5, 5]))  # no segmentation
    open(path, "w").write(json.dumps(content))
    named = {int(line.split("(id ")[1].split(")")[0]) for line in evaluation.segm_ground_truth_problems(path)}
    ground_truth = COCO(path)
    expected = {len(cases) + 1, len(cases) + 2}
    for k, (name, segmentation, valid) in enumerate(cases):
        if isinstance(segmentation, dict):
            readable = valid
        else:
            try:
                ground_truth.annToRLE(ground_truth.anns[k + 1])
                readable = True
            except Exception:
                readable = False
        if not readable:
            expected.add(k + 1)
    assert named == expected
    # pycocotools reads a polygon with an odd number of coordinates (the last one unused): not refused.
    assert {name for k, (name, _, _) in enumerate(cases) if k + 1 not in named} == {
        "triangle", "compressed RLE", "uncompressed RLE", "odd coordinates"}


def test_mask_rcnn_refuses_an_eval_file_pycocotools_cannot_read_before_it_builds_the_model(tmp_path, monkeypatch):
    from tests.conftest import tiny_detection_config

    (path, image_dir), _ = _segmentation_file(tmp_path)
    split = {"annotation_file": path, "image_dir": image_dir}
    config = tiny_detection_config(tmp_path / "unused")
    monkeypatch.setitem(registry.DATASETS["detection"], config.data.name,
                        registry.DetectionDataset(lambda data, workdir: {"train": split, "val": split}))
    # Building the module is free (it decides whether there is a mask head); initialising it is not.
    monkeypatch.setattr(detection_task.FasterRCNN, "init", lambda *args, **kwargs: pytest.fail("the model was built"))
    assert config.model.detector == "mask_rcnn"
    for train in (True, False):
        with pytest.raises(ValueError, match=r"instances.json: 8 annotations have a segmentation that COCOeval cannot "
                                             r"evaluate \(first: annotations\[3\] \(id 4\): pycocotools cannot read it"):
            detection_task.Detection().build(config, str(tmp_path / "run"), loop.DataMesh(config.batch_size), train=train)
    config.model.detector = "faster_rcnn"  # box AP only: the segmentations are never read
    config.batch_size = 1  # the file holds one image: a batch of 4 has no whole step (loop.schedule_length)
    with pytest.raises(pytest.fail.Exception, match="the model was built"):
        detection_task.Detection().build(config, str(tmp_path / "run"), loop.DataMesh(config.batch_size), train=True)
