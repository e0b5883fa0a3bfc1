"""Cityscapes in its official layout and the semantic segmentation pipeline (mmseg's transforms),
against the cityscapesscripts label table and numpy transcriptions written here."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cvolution_jax.data import cityscapes, pipeline, registry, semantic, transforms
from cvolution_jax.data.semantic_records import SemanticRecord, SemanticSet, from_coco, paint_objects, read_label
from tests.conftest import write_cityscapes

# cityscapesscripts' labels.py, (id, trainId) of all 34 labels (-1 license plate is never in a PNG).
LABELS_PY = [(0, 255), (1, 255), (2, 255), (3, 255), (4, 255), (5, 255), (6, 255), (7, 0), (8, 1), (9, 255),
             (10, 255), (11, 2), (12, 3), (13, 4), (14, 255), (15, 255), (16, 255), (17, 5), (18, 255), (19, 6),
             (20, 7), (21, 8), (22, 9), (23, 10), (24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (29, 255),
             (30, 255), (31, 16), (32, 17), (33, 18)]


def test_label_ids_map_to_train_ids_as_cityscapesscripts_does():
    ids = np.arange(34, dtype=np.uint8)
    table = dict(LABELS_PY)
    np.testing.assert_array_equal(cityscapes.train_ids(ids), [table.get(i, 255) for i in range(34)])
    assert len(cityscapes.CLASSES) == 19 and max(table) == cityscapes.MAX_LABEL_ID
    for outside in (34, 255):
        with pytest.raises(ValueError, match=rf"1 pixels of ids {outside} outside Cityscapes' label ids 0..33"):
            cityscapes.train_ids(np.array([7, outside], np.uint8))


def test_find_records_reads_the_official_layout_and_prefers_label_train_ids(tmp_path):
    written = write_cityscapes(tmp_path, "val", {"lindau": 2, "frankfurt": 1}, train_ids_for=("lindau_000000_000001",))
    records = cityscapes.find_records(str(tmp_path), "val")
    assert [os.path.basename(r.image_path) for r in records] == [
        "frankfurt_000000_000000_leftImg8bit.png", "lindau_000000_000000_leftImg8bit.png",
        "lindau_000000_000001_leftImg8bit.png"]
    mapped, train_ids = records[1], records[2]
    assert mapped.label_path.endswith("_gtFine_labelIds.png") and mapped.label_map is cityscapes.train_ids
    assert train_ids.label_path.endswith("_gtFine_labelTrainIds.png") and train_ids.label_map is None
    table = dict(LABELS_PY)
    want = np.vectorize(lambda i: table.get(int(i), 255))(written["lindau_000000_000000"])
    np.testing.assert_array_equal(read_label(mapped, 64, 128, 19), want)
    np.testing.assert_array_equal(read_label(train_ids, 64, 128, 19), np.full((64, 128), 5))


def test_missing_folders_and_labels_say_what_to_unpack(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit/ and gtFine/"):
        cityscapes.find_records(str(tmp_path), "train")
    write_cityscapes(tmp_path, "train", {"aachen": 2})
    os.remove(tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000001_gtFine_labelIds.png")
    with pytest.raises(FileNotFoundError, match="1 of the 2 train images have no label file.*aachen_000000_000001"):
        cityscapes.find_records(str(tmp_path), "train")


def _label(tmp_path, values, name="a_gtFine_labelIds.png"):
    """A 2x4 image and a label of `values` (PIL's mode from their dtype: uint8 L, uint16 I;16, float32 F)."""
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.asarray(values).reshape(2, 4)).save(tmp_path / name)
    return str(tmp_path / "a.png"), str(tmp_path / name)


def test_cityscapes_label_ids_outside_0_to_33_are_named_not_ignored(tmp_path):
    image, label = _label(tmp_path, np.array([7, 8, 33, 0, 34, 40, 7, 7], np.uint8))
    with pytest.raises(ValueError, match=r"a_gtFine_labelIds.png holds 2 pixels of ids 34, 40 outside Cityscapes' label ids 0..33"):
        read_label(SemanticRecord(image, label, label_map=cityscapes.train_ids), 2, 4, 19)


def test_a_16_bit_instance_ids_file_given_as_label_ids_is_refused_not_wrapped(tmp_path):
    """26001 (car, instance 1) mod 256 is 145; read as labelIds it would have trained as something else."""
    image, label = _label(tmp_path, np.array([26001, 26002, 7, 7, 24000, 7, 7, 7], np.uint16))
    with pytest.raises(ValueError, match=r"ids 24000, 26001, 26002 outside Cityscapes' label ids 0..33.*instanceIds"):
        read_label(SemanticRecord(image, label, label_map=cityscapes.train_ids), 2, 4, 19)


def test_a_16_bit_label_whose_values_fit_is_read_as_they_are(tmp_path):
    image, label = _label(tmp_path, np.array([0, 1, 18, 255, 3, 3, 3, 3], np.uint16), "a_labelTrainIds.png")
    got = read_label(SemanticRecord(image, label), 2, 4, 19)
    assert got.dtype == np.uint8 and got.ravel().tolist() == [0, 1, 18, 255, 3, 3, 3, 3]


@pytest.mark.parametrize("values, found", [
    (np.array([0, 19, 5, 255, 200, 5, 5, 5], np.uint8), "2 pixels of class ids 19, 200"),
    (np.array([0, 300, 5, 255, 5, 5, 5, 5], np.uint16), "1 pixels of class ids 300"),
])
def test_train_ids_outside_the_classes_and_255_are_named(tmp_path, values, found):
    image, label = _label(tmp_path, values, "a_labelTrainIds.png")
    with pytest.raises(ValueError, match=rf"a_labelTrainIds.png holds {found}, outside this dataset's 19 classes \(0..18\) and 255"):
        read_label(SemanticRecord(image, label), 2, 4, 19)


def test_a_float_or_rgb_label_is_refused(tmp_path):
    image, label = _label(tmp_path, np.zeros(8, np.float32), "a.tiff")
    with pytest.raises(ValueError, match=r"holds float32 values \(PNG mode F\); expected integer class ids"):
        read_label(SemanticRecord(image, label), 2, 4, 19)
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"has shape \(2, 4, 3\); expected one channel"):
        read_label(SemanticRecord(image, str(tmp_path / "rgb.png")), 2, 4, 19)


def test_check_labels_reads_every_label_or_a_spread_sample_and_leaves_damaged_files_to_the_pipeline(tmp_path):
    write_cityscapes(tmp_path, "val", {"lindau": 5})
    dataset = SemanticSet(tuple(cityscapes.find_records(str(tmp_path), "val")), cityscapes.CLASSES)
    assert semantic.check_labels(dataset) == 5 and semantic.check_labels(dataset, sample=2) == 2
    (tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000001_gtFine_labelIds.png").write_bytes(b"not a png")
    assert semantic.check_labels(dataset) == 5  # skipped and counted later, as in training
    Image.fromarray(np.full((64, 128), 34, np.uint8)).save(tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000004_gtFine_labelIds.png")
    with pytest.raises(ValueError, match="lindau_000000_000004_gtFine_labelIds.png holds 8192 pixels of ids 34"):
        semantic.check_labels(dataset)
    assert semantic.check_labels(dataset, sample=2) == 2  # frames 0 and 2: the sample misses it


def test_a_label_of_another_size_than_its_image_is_an_error(tmp_path):
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "a_label.png")
    with pytest.raises(ValueError, match="is 4x5 but its image .* is 4x6"):
        read_label(SemanticRecord(str(tmp_path / "a.png"), str(tmp_path / "a_label.png")), 4, 6, 19)


def test_painted_labels_put_later_objects_on_top_and_ignore_crowds():
    square = lambda r0, r1, c0, c1: {"size": [6, 6], "counts": _rle(r0, r1, c0, c1)}  # noqa: E731
    label = paint_objects([(1, square(0, 3, 0, 3), False), (2, square(2, 5, 2, 5), False),
                           (1, square(5, 6, 0, 6), True)], 6, 6)
    want = np.zeros((6, 6), np.uint8)
    want[0:3, 0:3] = 1
    want[2:5, 2:5] = 2
    want[5, :] = 255
    np.testing.assert_array_equal(label, want)


def _rle(r0, r1, c0, c1):
    """Uncompressed COCO RLE (column-major runs) of a 6x6 box mask."""
    mask = np.zeros((6, 6), np.uint8)
    mask[r0:r1, c0:c1] = 1
    flat, counts, value, run = mask.ravel(order="F"), [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    return counts + [run]


def test_random_crop_redraws_while_one_class_dominates():
    label = np.zeros((8, 8), np.uint8)
    label[:, 6:] = 1  # only crops reaching column 6+ hold two classes
    label[0, 7] = 255
    crop = (4, 4)
    for seed in range(20):
        got = semantic.random_crop_box(label, crop, 0.75, np.random.default_rng(seed))
        # Oracle: mmseg's loop over the same draws.
        rng = np.random.default_rng(seed)
        draw = lambda: (int(rng.integers(0, 5)), int(rng.integers(0, 5)))  # noqa: E731
        top, left = draw()
        for _ in range(10):
            values, counts = np.unique(label[top:top + 4, left:left + 4], return_counts=True)
            counts = counts[values != 255]
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                break
            top, left = draw()
        assert got == (top, left), seed
    # cat_max_ratio 1 takes the first draw.
    rng = np.random.default_rng(3)
    assert semantic.random_crop_box(label, crop, 1.0, np.random.default_rng(3)) == (int(rng.integers(0, 5)),
                                                                                   int(rng.integers(0, 5)))


def test_train_transform_without_randomness_left_is_normalise_flip_and_pad(tmp_path):
    write_cityscapes(tmp_path, "train", {"ulm": 1}, size=(16, 32))
    record, = cityscapes.find_records(str(tmp_path), "train")
    transform = semantic.TrainTransform(num_classes=19, scale=(32, 16), ratio_range=(1.0, 1.0), crop_size=(24, 24), cat_max_ratio=1.0,
                                        flip_prob=1.0, photometric=False)
    out = transform(record, np.random.default_rng(0))
    pixels = np.asarray(Image.open(record.image_path).convert("RGB"))
    label = read_label(record, 16, 32, 19)
    # The crop is 24x24 of a 16x32 image: all 16 rows, 24 columns from a random left edge, then
    # flipped and padded to 24x24 (image 0, label 255).
    assert out["image"].shape == (24, 24, 3) and out["label"].shape == (24, 24)
    assert out["image_size"].tolist() == [16, 24] and out["corrupt"] == 0
    assert (out["label"][16:] == 255).all() and (out["image"][16:] == 0).all()
    matches = [c for c in range(9) if np.array_equal(out["label"][:16], label[:, c:c + 24][:, ::-1])
               and np.allclose(out["image"][:16], transforms.normalize(pixels[:, c:c + 24][:, ::-1],
                                                                      transforms.IMAGENET_MEAN, transforms.IMAGENET_STD))]
    assert matches


def test_photometric_distortion_stays_in_range_and_is_reproducible():
    image = np.random.default_rng(0).uniform(0, 255, (8, 8, 3)).astype(np.float32)
    a = semantic.photometric_distortion(image, np.random.default_rng(5))
    b = semantic.photometric_distortion(image, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and 0 <= a.min() and a.max() <= 255


def data_config(root, **fields):
    return ml_collections.ConfigDict({"name": "cityscapes", "data_dir": str(root), "scale": (128, 64),
                                      "ratio_range": (0.5, 2.0), "crop_size": (32, 64), "cat_max_ratio": 0.75,
                                      "flip_prob": 0.5, "photometric": True, "num_workers": 0, "num_threads": 1,
                                      **fields})


def load_split(root, split="val"):
    return registry.get("segmentation", "cityscapes").load(data_config(root), str(root), split)


def eval_pass(dataset, root, *, batch_size, process_index=0, process_count=1):
    return pipeline.eval_pass(semantic.examples(dataset, data_config(root), train=False), batch_size=batch_size,
                              process_index=process_index, process_count=process_count, num_workers=0, num_threads=1)


def test_eval_pass_covers_every_image_once_over_processes_with_padding(tmp_path):
    write_cityscapes(tmp_path, "val", {"bonn": 3})
    dataset = load_split(tmp_path)
    seen = []
    for process in range(2):
        for batch in eval_pass(dataset, tmp_path, batch_size=1, process_index=process, process_count=2):
            assert batch["image"].shape == (1, 64, 128, 3) and batch["label"].shape == (1, 64, 128)
            if batch["valid"][0]:
                seen.append(batch["label"][0])
            else:
                assert (batch["label"] == 255).all()
    assert len(seen) == 3
    want = {tuple(read_label(r, 64, 128, 19).ravel()) for r in dataset.records}
    assert {tuple(s.ravel()) for s in seen} == want


def test_eval_of_mixed_image_sizes_names_two_of_them(tmp_path):
    write_cityscapes(tmp_path, "val", {"bonn": 1})
    write_cityscapes(tmp_path, "val", {"koeln": 1}, size=(32, 64))
    dataset = load_split(tmp_path)
    with pytest.raises(ValueError, match="bonn.* is 64x128 and .*koeln.* is 32x64"):
        semantic.eval_sizes(dataset, (128, 64))


def test_a_damaged_image_is_a_corrupt_slot_with_ignored_labels(tmp_path):
    write_cityscapes(tmp_path, "val", {"bonn": 2})
    (tmp_path / "leftImg8bit" / "val" / "bonn" / "bonn_000000_000001_leftImg8bit.png").write_bytes(b"not a png")
    dataset = load_split(tmp_path)
    dataset = SemanticSet(tuple(SemanticRecord(r.image_path, r.label_path, r.label_map, height=64, width=128)
                                for r in dataset.records), dataset.class_names)
    batch = next(iter(eval_pass(dataset, tmp_path, batch_size=2)))
    assert batch["valid"].tolist() == [1, 0] and batch["corrupt"].tolist() == [0, 1]
    assert (batch["label"][1] == 255).all()


def test_shapes_semantic_labels_paint_each_class(tmp_path):
    from cvolution_jax.data import shapes

    paths = shapes.write_shapes(tmp_path, num_train=2, num_val=1, image_size=32)
    records = from_coco(**paths["train"])
    content = json.loads(open(paths["train"]["annotation_file"]).read())
    assert len(records) == 2
    label = read_label(records[0], 32, 32, 4)
    from cvolution_jax.data.masks import decode_segmentation

    for annotation in (a for a in content["annotations"] if a["image_id"] == 1):
        visible = decode_segmentation(annotation["segmentation"], 32, 32) > 0
        assert (label[visible] == annotation["category_id"]).all()  # shapes' ids 1..3 are its classes
    assert set(np.unique(label)) <= {0, 1, 2, 3}
