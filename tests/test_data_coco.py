"""COCO detection input and the synthetic shapes data set: files, validation (`coco`), resizing,
flips, buckets, padding (`coco_transforms`), and through the pipeline's `GroupSampler` determinism,
resumption, multi-process slicing and eval coverage."""

import json
import logging
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cvolution_jax.data import coco, coco_transforms, pipeline, shapes, transforms
from tests.conftest import CATEGORIES, annotation, assert_batches_equal, coco_stream, take, write_coco

# pycocotools' decode under numpy 2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def read_tree(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def shapes_paths(tmp_path_factory):
    return shapes.write_shapes(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=6, image_size=64, seed=0)


# ------------------------------------------------------------------------------- shapes


def test_shapes_are_deterministic_idempotent_and_seeded(tmp_path, shapes_paths):
    root = os.path.dirname(shapes_paths["train"]["image_dir"])
    again = shapes.write_shapes(tmp_path / "again", num_train=12, num_val=6, image_size=64, seed=0)
    first, second = read_tree(root), read_tree(os.path.dirname(again["train"]["image_dir"]))
    assert sorted(first) == sorted(second) and len(first) == 12 + 6 + 2
    assert all(first[name] == second[name] for name in first)

    # Idempotent: a matching info block means nothing is rewritten.
    mtimes = {name: os.stat(os.path.join(root, name)).st_mtime_ns for name in first}
    assert shapes.write_shapes(root, num_train=12, num_val=6, image_size=64, seed=0) == shapes_paths
    assert {name: os.stat(os.path.join(root, name)).st_mtime_ns for name in first} == mtimes

    # Other parameters regenerate in place, with no temporary folders left behind.
    other = tmp_path / "again"
    shapes.write_shapes(other, num_train=12, num_val=6, image_size=64, seed=1)
    reseeded = read_tree(other)
    assert sorted(reseeded) == sorted(first)
    assert reseeded["train/000000.png"] != first["train/000000.png"]
    assert json.loads(reseeded["annotations/instances_train.json"])["info"]["seed"] == 1
    assert sorted(os.listdir(other)) == ["annotations", "train", "val"]


def test_shapes_killed_run_is_not_taken_as_complete(tmp_path):
    paths = shapes.write_shapes(tmp_path, num_train=2, num_val=1, image_size=32, seed=0)
    os.remove(os.path.join(paths["train"]["image_dir"], "000001.png"))  # as if interrupted
    shapes.write_shapes(tmp_path, num_train=2, num_val=1, image_size=32, seed=0)
    assert os.path.exists(os.path.join(paths["train"]["image_dir"], "000001.png"))


def test_shapes_annotations_are_the_visible_masks(shapes_paths):
    for split, stream in shapes.SPLITS.items():
        with open(shapes_paths[split]["annotation_file"]) as f:
            content = json.load(f)
        assert [c["id"] for c in content["categories"]] == [1, 2, 3]
        assert [c["name"] for c in content["categories"]] == ["rectangle", "ellipse", "triangle"]
        by_image = {}
        for annotation in content["annotations"]:
            by_image.setdefault(annotation["image_id"], []).append(annotation)
        assert len(content["annotations"]) >= len(content["images"])
        for index, image in enumerate(content["images"]):
            annotations = by_image.get(image["id"], [])
            assert 1 <= len(annotations) <= shapes.MAX_OBJECTS
            # The same stream redrawn gives the pixels and full areas the JSON does not store.
            pixels, objects = shapes.draw_image(64, np.random.default_rng((0, stream, index)))
            on_disk = np.asarray(Image.open(os.path.join(shapes_paths[split]["image_dir"], image["file_name"])))
            np.testing.assert_array_equal(on_disk, pixels)
            assert len(objects) == len(annotations)
            union = np.zeros((64, 64), int)
            for annotation, (category_id, visible, full_area) in zip(annotations, objects):
                mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
                np.testing.assert_array_equal(mask, visible)
                rows, cols = np.nonzero(mask)
                x, y = cols.min(), rows.min()
                assert annotation["bbox"] == [x, y, cols.max() - x + 1, rows.max() - y + 1]
                assert annotation["area"] == mask.sum()
                assert annotation["category_id"] == category_id and annotation["iscrowd"] == 0
                assert mask.sum() >= shapes.MIN_VISIBLE_PIXELS
                assert mask.sum() >= shapes.MIN_VISIBLE_FRACTION * full_area
                union += mask
            assert union.max() == 1  # visible parts never overlap: occlusion is accounted for


def test_shapes_val_is_held_out(shapes_paths):
    train = read_tree(shapes_paths["train"]["image_dir"])
    val = read_tree(shapes_paths["val"]["image_dir"])
    assert not set(train.values()) & set(val.values())


def test_shapes_command_line(tmp_path, capsys):
    shapes.main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--image-size", "32", "--seed", "3"])
    paths = json.loads(capsys.readouterr().out)
    with open(paths["val"]["annotation_file"]) as f:
        info = json.load(f)["info"]
    assert (info["num_images"], info["image_size"], info["seed"]) == (1, 32, 3)
    assert len(os.listdir(paths["train"]["image_dir"])) == 2


def test_shapes_loads_as_coco(shapes_paths):
    dataset = coco.load_coco(**shapes_paths["train"])
    assert dataset.category_ids == (1, 2, 3) and dataset.num_classes == 3
    assert len(dataset.records) == 12 and dataset.skipped == {}


# ------------------------------------------------------------------------------- loading




def test_load_converts_boxes_and_maps_noncontiguous_category_ids(tmp_path):
    polygon = [[1.0, 2.0, 8.0, 2.0, 8.0, 9.0]]
    path, image_dir = write_coco(
        tmp_path,
        images=[(10, 20, 30), (11, 12, 16)],
        annotations=[
            annotation(1, 10, 7, [2, 3, 10, 5], segmentation=polygon),
            annotation(2, 10, 3, [0.5, 1.5, 4, 6]),
            annotation(3, 10, 7, [20, 10, 10, 10], iscrowd=0),
        ],
        categories=CATEGORIES,
    )
    dataset = coco.load_coco(path, image_dir)
    assert dataset.category_ids == (3, 7) and dataset.category_names == ("three", "seven")
    assert dataset.annotation_file == path and dataset.skipped == {}
    first, empty = dataset.records
    assert (first.image_id, first.height, first.width) == (10, 20, 30)
    assert first.path == os.path.join(image_dir, "10.png")
    np.testing.assert_array_equal(first.boxes, np.float32([[2, 3, 12, 8], [0.5, 1.5, 4.5, 7.5], [20, 10, 30, 20]]))
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int32
    np.testing.assert_array_equal(first.labels, [1, 0, 1])
    assert first.segmentations == (polygon, None, None)
    # An image without annotations stays; the training stream decides whether to use it.
    assert empty.image_id == 11 and empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)


@pytest.mark.parametrize("case, field", [
    ("no_categories", "'categories'"),
    ("image_without_file_name", "'file_name'"),
    ("image_without_height", "'height'"),
    ("annotation_without_bbox", "'bbox'"),
    ("annotation_without_category_id", "'category_id'"),
    ("category_without_id", "'id'"),
])
def test_missing_keys_name_the_file_and_the_field(tmp_path, case, field):
    path, image_dir = write_coco(tmp_path, [(1, 8, 8)], [annotation(5, 1, 3, [1, 1, 2, 2])], [{"id": 3, "name": "a"}])
    content = json.loads(open(path).read())
    if case == "no_categories":
        del content["categories"]
    elif case == "image_without_file_name":
        del content["images"][0]["file_name"]
    elif case == "image_without_height":
        del content["images"][0]["height"]
    elif case == "annotation_without_bbox":
        del content["annotations"][0]["bbox"]
    elif case == "annotation_without_category_id":
        del content["annotations"][0]["category_id"]
    else:
        del content["categories"][0]["id"]
    open(path, "w").write(json.dumps(content))
    with pytest.raises(ValueError) as error:
        coco.load_coco(path, image_dir)
    assert path in str(error.value) and field in str(error.value)
    if case.startswith("annotation"):
        assert "annotations[0] (id 5)" in str(error.value)


def test_non_positive_crowd_and_outside_boxes_are_skipped_and_counted(tmp_path, caplog):
    path, image_dir = write_coco(
        tmp_path,
        images=[(1, 20, 20), (2, 20, 20)],
        annotations=[
            annotation(1, 1, 3, [1, 1, 0, 5]),
            annotation(2, 1, 3, [1, 1, 5, -1]),
            annotation(3, 1, 7, [1, 1, 5, 5], iscrowd=1),
            annotation(4, 1, 7, [2, 2, 4, 4]),
            annotation(5, 2, 3, [25, 1, 4, 4]),  # entirely right of the 20-pixel-wide image
        ],
        categories=CATEGORIES,
    )
    with caplog.at_level(logging.INFO, logger="cvolution_jax.data.coco"):
        dataset = coco.load_coco(path, image_dir)
    assert dataset.skipped == {coco.SKIP_NON_POSITIVE: 2, coco.SKIP_CROWD: 1, coco.SKIP_OUTSIDE: 1}
    np.testing.assert_array_equal(dataset.records[0].boxes, [[2, 2, 6, 6]])
    assert len(dataset.records[1].labels) == 0
    assert "non-positive box size 2" in caplog.text and "crowd 1" in caplog.text


def test_unknown_category_or_image_id_raises(tmp_path):
    path, image_dir = write_coco(tmp_path, [(1, 8, 8)], [annotation(42, 1, 5, [1, 1, 2, 2])], CATEGORIES)
    with pytest.raises(ValueError, match=r"annotations\[0\] \(id 42\) has category_id 5") as error:
        coco.load_coco(path, image_dir)
    assert path in str(error.value)
    path, image_dir = write_coco(tmp_path, [(1, 8, 8)], [annotation(42, 9, 3, [1, 1, 2, 2])], CATEGORIES)
    with pytest.raises(ValueError, match="image_id 9") as error:
        coco.load_coco(path, image_dir)
    assert path in str(error.value)


def test_missing_image_file_raises_naming_it(tmp_path):
    path, image_dir = write_coco(tmp_path, [(1, 8, 8), (2, 8, 8), (3, 8, 8)], [], CATEGORIES)
    os.remove(os.path.join(image_dir, "2.png"))
    with pytest.raises(FileNotFoundError) as error:
        coco.load_coco(path, image_dir)
    message = str(error.value)
    assert os.path.join(image_dir, "2.png") in message and path in message and "1 of the 3" in message


def test_undecodable_image_is_skipped_naming_it(tmp_path, caplog):
    path, image_dir = write_coco(tmp_path, [(1, 8, 8)], [annotation(1, 1, 3, [1, 1, 4, 4])], CATEGORIES)
    open(os.path.join(image_dir, "1.png"), "wb").write(b"not a png")
    record = coco.load_coco(path, image_dir).records[0]
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.data.coco_transforms"):
        slot = coco_transforms.Preprocess((8, 8), ((8, 8),), 4)(record, None)
    assert os.path.join(image_dir, "1.png") in caplog.text
    assert (slot["corrupt"], slot["image_id"]) == (1, 1)  # the pipeline makes it a slot with valid 0
    assert not slot["image"].any() and not slot["gt_valid"].any() and slot["image"].shape == (8, 8, 3)


# ------------------------------------------------------------------------- preprocessing


def test_rescale_size_follows_mmcv():
    # factor = min(40 / 100, 20 / 50) = 0.4
    assert transforms.rescale_size(100, 50, (40, 20)) == (40, 20)
    assert transforms.rescale_size(50, 100, (40, 20)) == (20, 40)
    assert transforms.rescale_size(50, 100, (20, 40)) == (20, 40)  # either order of (long, short)
    # COCO's 480 x 640 at (1333, 800): factor min(1333 / 640, 800 / 480) = 5/3 -> 1066.67 + 0.5.
    assert transforms.rescale_size(480, 640, (1333, 800)) == (800, 1067)
    # A long thin image is limited by the long side: 1333 / 1000 -> (133.3 + 0.5, 1333).
    assert transforms.rescale_size(100, 1000, (1333, 800)) == (133, 1333)


def test_resize_flip_normalise_and_padding_by_hand(tmp_path):
    # 50 x 100 (h x w): left half red, right half blue; one 10 x 15 box at x 10..40, y 5..20.
    path, image_dir = write_coco(tmp_path, [(1, 50, 100)], [annotation(1, 1, 7, [10, 5, 30, 15])], CATEGORIES)
    pixels = np.zeros((50, 100, 3), np.uint8)
    pixels[:, :50] = (200, 0, 0)
    pixels[:, 50:] = (0, 0, 200)
    Image.fromarray(pixels).save(os.path.join(image_dir, "1.png"))
    record = coco.load_coco(path, image_dir).records[0]
    red = (np.float32([200, 0, 0]) - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
    blue = (np.float32([0, 0, 200]) - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD

    # Resized to 20 x 40 (factor 0.4), in bucket (24, 48) after skipping the too small (16, 64).
    process = coco_transforms.Preprocess(scale=(40, 20), buckets=((16, 64), (24, 48), (48, 48)), max_gt=3, flip_prob=1.0)
    plain = coco_transforms.Preprocess(scale=(40, 20), buckets=((16, 64), (24, 48), (48, 48)), max_gt=3)(record, None)
    flipped = process(record, np.random.default_rng(0))
    for out, left, right in ((plain, red, blue), (flipped, blue, red)):
        assert out["image"].shape == (24, 48, 3) and out["image"].dtype == np.float32
        np.testing.assert_allclose(out["image"][:20, :15], np.broadcast_to(left, (20, 15, 3)), atol=1e-5)
        np.testing.assert_allclose(out["image"][:20, 25:40], np.broadcast_to(right, (20, 15, 3)), atol=1e-5)
        assert not out["image"][20:].any() and not out["image"][:, 40:].any()
        np.testing.assert_array_equal(out["image_size"], [20, 40])
        np.testing.assert_allclose(out["scale"], [0.4, 0.4])
        assert out["image_id"] == 1 and out["corrupt"] == 0
        np.testing.assert_array_equal(out["labels"], [1, -1, -1])
        np.testing.assert_array_equal(out["gt_valid"], [True, False, False])
        np.testing.assert_array_equal(out["boxes"][1:], 0)
    # xyxy (10, 5, 40, 20) * 0.4 = (4, 2, 16, 8); flipped in width 40: (40 - 16, 2, 40 - 4, 8).
    np.testing.assert_allclose(plain["boxes"][0], [4, 2, 16, 8], rtol=1e-6)
    np.testing.assert_allclose(flipped["boxes"][0], [24, 2, 36, 8], rtol=1e-6)
    assert not plain["flipped"] and flipped["flipped"]
    assert not coco_transforms.Preprocess((40, 20), ((24, 48),), 3, flip_prob=0.0)(record, np.random.default_rng(0))["flipped"]


def test_boxes_scale_per_axis_and_clip_to_the_image(tmp_path):
    # 30 x 44 (h x w) at (20, 14): factor min(20 / 44, 14 / 30) = 5/11 -> (int(14.14), int(20.5))
    # = 14 x 20, so the axes scale by 14/30 (rows) and 20/44 (columns), not by one factor.
    path, image_dir = write_coco(tmp_path, [(1, 30, 44)], [annotation(1, 1, 3, [4, 6, 44, 30])], CATEGORIES)
    record = coco.load_coco(path, image_dir).records[0]
    out = coco_transforms.Preprocess((20, 14), ((32, 32),), 2)(record, None)
    np.testing.assert_array_equal(out["image_size"], [14, 20])
    np.testing.assert_allclose(out["scale"], [14 / 30, 20 / 44], rtol=1e-6)
    # xyxy (4, 6, 48, 36): x2 = 48 * 20/44 = 21.8 and y2 = 36 * 14/30 = 16.8 lie past the
    # resized image, so they are clipped to 20 and 14.
    np.testing.assert_allclose(out["boxes"][0], [4 * 20 / 44, 6 * 14 / 30, 20, 14], rtol=1e-6)


def test_bucket_choice_and_the_error_when_none_fits(tmp_path):
    assert pipeline.choose_bucket(20, 40, ((16, 16), (24, 48), (48, 48))) == 1
    assert pipeline.choose_bucket(20, 40, ((48, 48), (24, 48))) == 0  # the first that fits
    assert pipeline.choose_bucket(20, 40, ((40, 20),)) is None
    path, image_dir = write_coco(tmp_path, [(1, 20, 20), (2, 50, 100)], [], CATEGORIES)
    dataset = coco.load_coco(path, image_dir)
    options = dict(scale=(40, 20), buckets=((40, 20),), max_gt=2)
    with pytest.raises(ValueError, match=r"2\.png \(id 2, 50x100\) is 20x40") as error:
        coco_transforms.examples(dataset, train=False, **options)
    assert "buckets must cover" in str(error.value)
    with pytest.raises(ValueError, match=r"2\.png"):
        coco_transforms.examples(dataset, train=True, flip_prob=0.5, drop_empty=False, **options)


# ------------------------------------------------------------------------------- streams


@pytest.fixture
def mixed(tmp_path):
    """10 landscape (20 x 40 after resizing) and 6 portrait (40 x 20) images, 1..3 boxes each."""
    images = [(i, 50, 100) for i in range(1, 11)] + [(i, 100, 50) for i in range(11, 17)]
    annotations = []
    for image_id, _, _ in images:
        for k in range(1 + image_id % 3):
            annotations.append(annotation(len(annotations) + 1, image_id, (3, 7)[k % 2], [5 * k, 3, 10 + k, 12]))
    path, image_dir = write_coco(tmp_path, images, annotations, CATEGORIES)
    return coco.load_coco(path, image_dir)


BUCKETS = ((24, 48), (48, 24))


def train(dataset, *, batch_size=4, **kw):
    return coco_stream(dataset, train=True, batch_size=batch_size, scale=(40, 20), buckets=BUCKETS, max_gt=4,
                       flip_prob=0.5, **kw)


def test_train_stream_groups_buckets_and_covers_each_epoch(mixed):
    batches = take(iter(train(mixed)), 6)  # 10 // 4 + 6 // 4 = 3 batches per epoch
    for batch in batches:
        assert batch["image"].shape[1:3] in BUCKETS
        landscape = batch["image"].shape[1:3] == (24, 48)
        np.testing.assert_array_equal(batch["image_size"], [[20, 40] if landscape else [40, 20]] * 4)
        assert batch["valid"].tolist() == [1] * 4
        assert batch["boxes"].shape == (4, 4, 4) and batch["labels"].dtype == np.int32
        # Targets come from the right image: as many valid slots as its annotations.
        np.testing.assert_array_equal(batch["gt_valid"].sum(1), 1 + batch["image_id"] % 3)
    for epoch in (batches[:3], batches[3:]):
        ids = np.concatenate([b["image_id"] for b in epoch])
        assert len(set(ids.tolist())) == 12
        assert sorted(b["image"].shape[1:3] for b in epoch) == [(24, 48), (24, 48), (48, 24)]
    assert [b["image_id"].tolist() for b in batches[:3]] != [b["image_id"].tolist() for b in batches[3:]]
    # Image i of epoch e flips by its own generator (seed, e, i): fresh flips every epoch.
    for t, batch in enumerate(batches):
        expected = [np.random.default_rng((0, t // 3, i - 1)).random() < 0.5 for i in batch["image_id"]]
        np.testing.assert_array_equal(batch["flipped"], expected)
    assert any(b["flipped"].any() for b in batches) and not all(b["flipped"].all() for b in batches)


def test_train_stream_is_deterministic_and_resumes_exactly(mixed):
    assert_batches_equal(take(iter(train(mixed)), 4), take(iter(train(mixed)), 4))
    ids = [b["image_id"].tolist() for b in take(iter(train(mixed)), 3)]
    assert ids != [b["image_id"].tolist() for b in take(iter(train(mixed, seed=1)), 3)]
    # grain pickles the pipeline into its worker processes.
    assert_batches_equal(take(iter(pickle.loads(pickle.dumps(train(mixed)))), 3), take(iter(train(mixed)), 3))

    it = iter(train(mixed))
    take(it, 2)
    state = it.get_state()
    expected = take(it, 5)  # crosses into the next epoch
    fresh = iter(train(mixed))
    fresh.set_state(json.loads(json.dumps(state)))
    assert_batches_equal(take(fresh, 5), expected)


def test_process_slices_concatenate_to_the_one_process_batch(mixed):
    whole = take(iter(train(mixed, batch_size=4)), 4)
    parts = [take(iter(train(mixed, batch_size=2, process_index=p, process_count=2)), 4) for p in range(2)]
    for t, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([parts[0][t][key], parts[1][t][key]]), batch[key], err_msg=key)


def test_drop_empty_and_global_batch_too_large(tmp_path):
    path, image_dir = write_coco(
        tmp_path, [(1, 10, 10), (2, 10, 10), (3, 10, 10)], [annotation(1, 1, 3, [1, 1, 4, 4])], CATEGORIES
    )
    dataset = coco.load_coco(path, image_dir)
    options = dict(train=True, scale=(10, 10), buckets=((10, 10),), max_gt=2, flip_prob=0.0)
    ids = [b["image_id"].tolist() for b in take(iter(coco_stream(dataset, batch_size=1, **options)), 3)]
    assert ids == [[1]] * 3
    ids = np.concatenate([b["image_id"] for b in take(iter(coco_stream(
        dataset, batch_size=1, drop_empty=False, **options)), 3)])
    assert sorted(ids.tolist()) == [1, 2, 3]
    with pytest.raises(ValueError, match=r"No bucket holds a whole global batch \(2 x 1 processes = 2 images\): "
                                         r"training images per bucket \[1\] \(buckets \(\(10, 10\),\)\)"):
        coco_stream(dataset, batch_size=2, **options)


def test_truncation_to_max_gt_is_logged(tmp_path, caplog):
    path, image_dir = write_coco(
        tmp_path, [(1, 10, 10)], [annotation(k, 1, 3, [k, 0, 1, 1]) for k in range(1, 6)], CATEGORIES
    )
    dataset = coco.load_coco(path, image_dir)
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.data.coco_transforms"):
        batch = next(iter(coco_stream(dataset, train=False, batch_size=1, scale=(10, 10), buckets=((10, 10),), max_gt=3)))
    assert "1 images have more than max_gt=3 boxes (up to 5)" in caplog.text
    np.testing.assert_array_equal(batch["boxes"][0, :, 0], [1, 2, 3])  # the first three, in file order


def test_eval_pass_covers_every_image_once_with_equal_batch_counts(mixed):
    def run(process_index, process_count, batch_size=3):
        return list(coco_stream(mixed, train=False, batch_size=batch_size, scale=(40, 20), buckets=BUCKETS, max_gt=4,
                                process_index=process_index, process_count=process_count))

    per_process = [run(p, 2) for p in range(2)]
    # Global batches of 6: landscape 10 -> 2 batches, portrait 6 -> 1 batch.
    assert len(per_process[0]) == len(per_process[1]) == 3
    ids = np.concatenate([b["image_id"][b["valid"] == 1] for batches in per_process for b in batches])
    assert sorted(ids.tolist()) == list(range(1, 17))
    for batches in per_process:
        for b in batches:
            real = b["valid"] == 1
            assert not b["flipped"].any()
            np.testing.assert_array_equal(b["image_id"][~real], -1)
            np.testing.assert_array_equal(b["labels"][~real], -1)
            assert not b["image"][~real].any() and not b["gt_valid"][~real].any()
            assert (b["image_id"][real] >= 1).all()
    # The same global batches as one process with the global batch size.
    single = run(0, 1, batch_size=6)
    for t, batch in enumerate(single):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([per_process[0][t][key], per_process[1][t][key]]), batch[key], err_msg=key
            )


def test_instance_masks_are_box_crops_of_the_segmentation_flipped_with_the_image(tmp_path):
    # 40 x 60 image; a polygon triangle and an RLE disk, the disk's box poking past the right edge.
    triangle = [[6.0, 4.0, 30.0, 4.0, 6.0, 30.0]]
    yy, xx = np.mgrid[:40, :60]
    disk = ((yy - 20) ** 2 + (xx - 52) ** 2 <= 81).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(disk))
    rle["counts"] = rle["counts"].decode("ascii")
    path, image_dir = write_coco(tmp_path, [(1, 40, 60)], [
        annotation(1, 1, 7, [6, 4, 24, 26], segmentation=triangle),
        annotation(2, 1, 3, [43, 11, 20, 19], segmentation=rle),
    ], CATEGORIES)
    record = coco.load_coco(path, image_dir).records[0]
    size = 16
    plain = coco_transforms.Preprocess((30, 20), ((24, 32),), max_gt=3, mask_size=size)(record, None)
    flipped = coco_transforms.Preprocess((30, 20), ((24, 32),), max_gt=3, flip_prob=1.0, mask_size=size)(record, np.random.default_rng(0))
    full = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(triangle, 40, 60))), disk]
    boxes = [(6, 4, 30, 30), (43, 11, 60, 30)]  # original pixels, the disk's clipped to the width 60
    assert plain["masks"].shape == (3, size, size) and plain["masks"].dtype == np.uint8
    for i, (mask, (x1, y1, x2, y2)) in enumerate(zip(full, boxes)):
        # The crop samples the box at the centres of a size x size grid: nearest pixel by hand,
        # away from the mask's edges where bilinear and nearest can differ.
        ys = y1 + (np.arange(size) + 0.5) * (y2 - y1) / size
        xs = x1 + (np.arange(size) + 0.5) * (x2 - x1) / size
        nearest = mask[np.floor(ys).astype(int)][:, np.floor(xs).astype(int)]
        inside = np.ones_like(nearest, bool)
        for axis in (0, 1):
            inside &= np.diff(nearest, axis=axis, prepend=np.take(nearest, [0], axis)) == 0
            inside &= np.diff(nearest, axis=axis, append=np.take(nearest, [-1], axis)) == 0
        assert inside.mean() > 0.6
        np.testing.assert_array_equal(plain["masks"][i][inside], nearest[inside])
        np.testing.assert_array_equal(flipped["masks"][i], plain["masks"][i][:, ::-1])
    assert not plain["masks"][2].any()
    assert "masks" not in coco_transforms.Preprocess((30, 20), ((24, 32),), max_gt=3)(record, None)


def test_instance_masks_need_a_segmentation(tmp_path):
    path, image_dir = write_coco(tmp_path, [(1, 20, 20)], [annotation(1, 1, 7, [2, 2, 8, 8])], CATEGORIES)
    record = coco.load_coco(path, image_dir).records[0]
    with pytest.raises(ValueError, match="no 'segmentation'.*mask_size=0"):
        coco_transforms.Preprocess((20, 20), ((20, 20),), max_gt=2, mask_size=8)(record, None)
