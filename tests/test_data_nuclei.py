"""The nuclei sample writer on a fake stardist wheel (no network): tiling, RLE masks, boxes,
crowd fragments, COCO loading, idempotence and the errors a user sees."""

import io
import json
import os
import subprocess
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cvolution_jax.data import coco, nuclei

# pycocotools' decode under numpy 2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

IMAGE_MEMBER = "stardist/data/images/img2d.tif"
LABELS_MEMBER = "stardist/data/images/mask2d.tif"
# Written out rather than taken from the module: 13 rows x 9 columns of 128 x 128 tiles,
# stride 32, left of x = 384; val is the 512 x 128 strip to its right.
TRAIN_CROPS = [(x, y, 128, 128) for y in range(0, 385, 32) for x in range(0, 257, 32)]
VAL_CROP = (384, 0, 128, 512)

# (label, centre y, centre x, radius). Ids are sparse like the real mask's (125 nuclei, ids up to 183).
DISKS = [
    (7, 200, 384, 12),  # crosses x = 384: part train, part val
    (31, 60, 27, 6),  # the tile at x0 = 32 sees 8 px of it (cols 32, 33): a crowd fragment
    (40, 70, 70, 1),  # 5 px, whole in every tile that shows it: a real tiny nucleus, not crowd
    (52, 300, 150, 20),
    (53, 300, 176, 8),  # touches 52 (drawn later, so it wins the shared pixels)
    (99, 3, 450, 9),  # cut by the image's top edge only: whole as far as the data knows
    (150, 480, 100, 15),
]


def draw_sample():
    """(image uint16 [512, 512], labels uint16 [512, 512]) like the wheel's TIFFs."""
    yy, xx = np.mgrid[0:512, 0:512]
    labels = np.zeros((512, 512), np.uint16)
    for label, cy, cx, radius in DISKS:
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = label
    noise = np.random.default_rng(0).integers(0, 40, (512, 512))
    image = (100 + noise + 20 * (labels > 0) * (labels % 50 + 10)).astype(np.uint16)
    return image, labels


def tiff_bytes(array):
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    assert image.mode == "I;16"  # the mode of both real TIFFs
    image.save(buffer, format="TIFF")
    return buffer.getvalue()


def make_wheel(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("stardist/__init__.py", "")
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


@pytest.fixture(scope="module")
def sample():
    return draw_sample()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, sample):
    image, labels = sample
    path = tmp_path_factory.mktemp("wheel") / "stardist-0.9.2-cp311-cp311-fake.whl"
    return make_wheel(path, {IMAGE_MEMBER: tiff_bytes(image), LABELS_MEMBER: tiff_bytes(labels)})


@pytest.fixture(scope="module")
def written(tmp_path_factory, wheel):
    out_dir = tmp_path_factory.mktemp("nuclei")
    return out_dir, nuclei.write_nuclei(out_dir, wheel=wheel)


def read_split(paths, split):
    with open(paths[split]["annotation_file"]) as f:
        return json.load(f)


def test_read_sample_returns_the_tiffs(wheel, sample):
    image, labels = nuclei.read_sample(wheel)
    assert image.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(image, sample[0])
    np.testing.assert_array_equal(labels, sample[1])


def test_tiles_strip_and_pixels(written, sample):
    out_dir, paths = written
    assert paths == {split: {"annotation_file": str(out_dir / "annotations" / f"instances_{split}.json"),
                             "image_dir": str(out_dir / split)} for split in ("train", "val")}
    image = sample[0].astype(np.float64)
    low, high = np.percentile(image, [1, 99.8])
    gray = np.rint(np.clip((image - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    for split, expected_crops in (("train", TRAIN_CROPS), ("val", [VAL_CROP])):
        content = read_split(paths, split)
        assert [im["id"] for im in content["images"]] == list(range(1, len(expected_crops) + 1))
        assert [tuple(im["crop"]) for im in content["images"]] == expected_crops
        assert sorted(os.listdir(paths[split]["image_dir"])) == sorted(im["file_name"] for im in content["images"])
        for im in content["images"][::29]:
            x, y, w, h = im["crop"]
            assert (im["width"], im["height"]) == (w, h)
            pixels = np.asarray(Image.open(os.path.join(paths[split]["image_dir"], im["file_name"])))
            np.testing.assert_array_equal(pixels, np.repeat(gray[y:y + h, x:x + w, None], 3, axis=2))
    assert len(TRAIN_CROPS) == 117


def test_annotations_match_the_label_map(written, sample):
    _, paths = written
    labels = sample[1].astype(np.int64)
    full = {label: int((labels == label).sum()) for label, *_ in DISKS}
    seen = {"train": set(), "val": set()}
    crowd_labels = set()
    for split in ("train", "val"):
        content = read_split(paths, split)
        assert content["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
        by_image = {im["id"]: [] for im in content["images"]}
        for annotation in content["annotations"]:
            by_image[annotation["image_id"]].append(annotation)
        assert [a["id"] for a in content["annotations"]] == list(range(1, len(content["annotations"]) + 1))
        for im in content["images"]:
            x, y, w, h = im["crop"]
            crop = labels[y:y + h, x:x + w]
            found = []
            for annotation in by_image[im["id"]]:
                assert isinstance(annotation["segmentation"]["counts"], str)
                mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
                (label,) = np.unique(crop[mask])
                np.testing.assert_array_equal(mask, crop == label)
                rows, cols = np.nonzero(mask)
                assert annotation["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1,
                                              rows.max() - rows.min() + 1]
                assert annotation["area"] == mask.sum()
                assert annotation["category_id"] == 1
                cut_small = mask.sum() < full[label] and mask.sum() < 16
                assert annotation["iscrowd"] == int(cut_small)
                if cut_small:
                    crowd_labels.add(int(label))
                found.append(int(label))
            assert sorted(found) == sorted(set(np.unique(crop)) - {0})
            seen[split].update(found)
    assert seen["val"] == {7, 99}
    assert seen["train"] == {7, 31, 40, 52, 53, 150}
    assert 31 in crowd_labels and 40 not in crowd_labels
    # Disk 31 (rows 54..66, cols 21..33) seen from the tile at (32, 32): cols 32..33, rows 57..63.
    train = read_split(paths, "train")
    tile = next(im["id"] for im in train["images"] if im["crop"] == [32, 32, 128, 128])
    (fragment,) = [a for a in train["annotations"] if a["image_id"] == tile and a["bbox"][0] == 0 and a["area"] < 16]
    assert fragment["iscrowd"] == 1 and fragment["area"] == 8 and fragment["bbox"] == [0, 25, 2, 7]


def test_load_coco_skips_crowds_and_pycocotools_reads_both(written, sample):
    _, paths = written
    for split in ("train", "val"):
        content = read_split(paths, split)
        crowd = sum(a["iscrowd"] for a in content["annotations"])
        dataset = coco.load_coco(**paths[split])
        assert len(dataset.records) == len(content["images"])
        assert sum(len(r.labels) for r in dataset.records) == len(content["annotations"]) - crowd
        assert dataset.skipped == ({coco.SKIP_CROWD: crowd} if crowd else {})
        assert dataset.category_names == ("nucleus",)
        api = COCO(paths[split]["annotation_file"])
        assert len(api.getAnnIds(iscrowd=False)) == len(content["annotations"]) - crowd
        first = content["annotations"][0]
        np.testing.assert_array_equal(api.annToMask(api.anns[first["id"]]),
                                      mask_utils.decode(first["segmentation"]))
    assert sum(a["iscrowd"] for a in read_split(paths, "train")["annotations"]) > 0


def test_rerun_writes_nothing_and_needs_no_wheel(written, monkeypatch):
    out_dir, paths = written
    files = [os.path.join(root, name) for root, _, names in os.walk(out_dir) for name in names]
    mtimes = {path: os.stat(path).st_mtime_ns for path in files}

    def no_pip(*args, **kwargs):
        raise AssertionError("write_nuclei ran pip on a complete out_dir")

    monkeypatch.setattr(nuclei.subprocess, "run", no_pip)
    assert nuclei.write_nuclei(out_dir) == paths
    assert {path: os.stat(path).st_mtime_ns for path in files} == mtimes
    assert sorted(os.listdir(out_dir)) == ["annotations", "train", "val"]


def test_incomplete_split_is_rewritten(tmp_path, wheel):
    paths = nuclei.write_nuclei(tmp_path, wheel=wheel)
    os.remove(os.path.join(paths["val"]["image_dir"], "000000.png"))
    train_mtime = os.stat(paths["train"]["annotation_file"]).st_mtime_ns
    nuclei.write_nuclei(tmp_path, wheel=wheel)
    assert os.path.exists(os.path.join(paths["val"]["image_dir"], "000000.png"))
    assert os.stat(paths["train"]["annotation_file"]).st_mtime_ns == train_mtime


def test_bad_wheels_raise_with_advice(tmp_path, sample):
    partial = make_wheel(tmp_path / "partial.whl", {IMAGE_MEMBER: tiff_bytes(sample[0])})
    with pytest.raises(ValueError, match=r"lacks stardist/data/images/mask2d\.tif.*stardist==0\.9\.2"):
        nuclei.read_sample(partial)
    not_zip = tmp_path / "not.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a zip file"):
        nuclei.read_sample(not_zip)
    small = make_wheel(tmp_path / "small.whl", {IMAGE_MEMBER: tiff_bytes(sample[0][:64]),
                                                LABELS_MEMBER: tiff_bytes(sample[1])})
    with pytest.raises(ValueError, match=r"img2d\.tif has shape \(64, 512\); expected .*512 x 512"):
        nuclei.read_sample(small)


def test_fetch_wheel_reuses_a_wheel_and_explains_pip_failures(tmp_path, monkeypatch):
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(nuclei.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"(?s)No matching distribution.*--wheel PATH"):
        nuclei.fetch_wheel(tmp_path / "empty")
    assert len(calls) == 2 and "--platform" in calls[1] and "stardist==0.9.2" in calls[0]

    existing = tmp_path / "have" / "stardist-0.9.2-py3-none-any.whl"
    existing.parent.mkdir()
    existing.write_bytes(b"")
    assert nuclei.fetch_wheel(existing.parent) == str(existing)
    assert len(calls) == 2
