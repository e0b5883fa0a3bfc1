"""COCO evaluation through the real pycocotools path, on ground truth built here; and the pictures.

The expected numbers are computed by hand from COCO's definitions (101 recall points, IoU
thresholds 0.50:0.05:0.95, the mean over categories with ground truth), not by pycocotools.
"""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from cvolution_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: E402
from cvolution_jax.detection.evaluation import (  # noqa: E402
    evaluate, masks_to_rle, to_coco_results, write_results)
from cvolution_jax.data.transforms import denormalize_image  # noqa: E402
from cvolution_jax.detection.visualize import class_colour, draw_detections  # noqa: E402

CATEGORY_IDS = (3, 7, 12)  # contiguous label i is COCO category CATEGORY_IDS[i]
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
             "ARl")


def write_ground_truth(tmp_path, images, annotations, name="gt.json"):
    """images: [(id, height, width)]; annotations: [(image_id, category_id, xywh, iscrowd)]."""
    dataset = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"}
                   for i, h, w in images],
        "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS],
        "annotations": [{"id": n + 1, "image_id": image, "category_id": category,
                         "bbox": list(xywh), "area": xywh[2] * xywh[3], "iscrowd": crowd}
                        for n, (image, category, xywh, crowd) in enumerate(annotations)],
    }
    path = tmp_path / name
    path.write_text(json.dumps(dataset))
    return path


# Boxes of every size range (small < 32^2 <= medium < 96^2 <= large), three categories, a crowd
# region, and image 9 with no annotations at all.
IMAGES = [(1, 200, 300), (2, 150, 100), (5, 120, 160), (9, 80, 80)]
ANNOTATIONS = [
    (1, 3, (10, 20, 120, 100), 0),   # large
    (1, 7, (150, 30, 40, 50), 0),    # medium
    (1, 3, (200, 150, 20, 15), 0),   # small
    (1, 12, (0, 0, 300, 200), 1),    # crowd: ignored by COCOeval
    (2, 12, (5, 5, 30, 60), 0),      # medium
    (2, 12, (50, 90, 8, 12), 0),     # small
    (5, 7, (20, 10, 100, 100), 0),   # large
    (5, 3, (60, 40, 25, 25), 0),     # small
    (5, 12, (100, 70, 50, 40), 0),   # medium
]


@pytest.fixture
def ground_truth(tmp_path):
    return write_ground_truth(tmp_path, IMAGES, ANNOTATIONS)


def padded_batch(annotations, slot_ids, scales, detections_per_image=5):
    """The detector's view of `annotations`: a padded batch in resized pixels, as to_coco_results
    takes it. slot_ids: image id per batch slot (-1: padding slot); scales: (sy, sx) per slot."""
    batch = len(slot_ids)
    boxes = np.full((batch, detections_per_image, 4), np.nan, np.float32)  # padding is garbage
    scores = np.zeros((batch, detections_per_image), np.float32)
    labels = np.full((batch, detections_per_image), 99, np.int32)
    valid = np.zeros((batch, detections_per_image), bool)
    for b, image_id in enumerate(slot_ids):
        sy, sx = scales[b]
        if image_id == -1:  # a padding slot whose detections look valid: the image id drops them
            boxes[b] = [0, 0, 5, 5]
            valid[b] = True
            labels[b] = 0
            continue
        mine = [(c, xywh) for i, c, xywh, crowd in annotations if i == image_id and not crowd]
        for d, (category, (x, y, w, h)) in enumerate(mine):
            boxes[b, d] = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
            scores[b, d] = 0.9 - 0.1 * d
            labels[b, d] = CATEGORY_IDS.index(category)
            valid[b, d] = True
    return (np.array(slot_ids), boxes, scores, labels, valid, np.array(scales, np.float32))


def test_ground_truth_fed_back_scores_one(ground_truth, tmp_path):
    slot_ids = [5, -1, 1, 2, 9, -1]  # unordered, with padding slots and an image without objects
    scales = [(1.5, 2.0), (1.0, 1.0), (0.8, 1.25), (4.0, 3.0), (2.0, 2.0), (1.0, 1.0)]
    results = to_coco_results(*padded_batch(ANNOTATIONS, slot_ids, scales),
                              category_ids=CATEGORY_IDS)
    assert len(results) == sum(not crowd for *_, crowd in ANNOTATIONS)
    assert {r["image_id"] for r in results} == {1, 2, 5}
    path = write_results(tmp_path / "out" / "detections.json", results)
    assert json.loads(open(path).read()) == results  # re-readable, identical
    stats = evaluate(str(ground_truth), path)
    for key in STAT_KEYS:
        if key != "AR1":
            assert stats[key] == pytest.approx(1.0, abs=1e-9), key
    # One detection per image and category finds 2 of category 3's 3 objects (image 1 holds two),
    # 2 of 2 of category 7's and 2 of 3 of category 12's (image 2 holds two; the crowd is ignored).
    assert stats["AR1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)

    # A confident detection on the crowd region is matched to it and ignored, not a false positive.
    crowd = {"image_id": 1, "category_id": 12, "bbox": [100, 50, 50, 50], "score": 0.99}
    assert evaluate(COCO(str(ground_truth)), results + [crowd])["AP"] == pytest.approx(1.0)
    # Evaluating did not write loadRes's fields into the caller's dicts.
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}


def test_default_numbers_and_summary_are_cocoeval_s(ground_truth):
    # Imperfect detections so that the rows differ: every box shifted, one dropped, one extra.
    results = []
    for n, (image, category, (x, y, w, h), crowd) in enumerate(ANNOTATIONS[1:]):
        results.append({"image_id": image, "category_id": category,
                        "bbox": [x + 0.1 * w * (n % 3), y, w, h], "score": 0.3 + 0.07 * n})
    results.append({"image_id": 9, "category_id": 3, "bbox": [1, 1, 20, 20], "score": 0.5})
    stats = evaluate(ground_truth, results)

    gt = COCO(str(ground_truth))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        official = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), "bbox")
        official.evaluate()
        official.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        official.summarize()
    assert [stats[key] for key in STAT_KEYS] == pytest.approx(official.stats.tolist(), abs=1e-12)
    assert stats["summary"] == printed.getvalue()
    assert len(stats["summary"].splitlines()) == 12
    assert 0 < stats["AP"] < 1


def test_iou_0_72_counts_at_five_of_ten_thresholds(tmp_path):
    # One 100x100 object; a 100x72 detection has IoU 7200 / 10000 = 0.72, a match at the
    # thresholds 0.50, 0.55, 0.60, 0.65, 0.70 (precision 1 at every recall) and a miss at the other
    # five (precision 0): AP = 5/10, AP50 = 1, AP75 = 0, recall = 5/10.
    gt = write_ground_truth(tmp_path, [(4, 120, 120)], [(4, 3, (0, 0, 100, 100), 0)])
    detection = {"image_id": 4, "category_id": 3, "bbox": [0, 0, 100, 72], "score": 0.8}
    stats = evaluate(gt, [detection])
    assert stats["AP"] == pytest.approx(0.5)
    assert stats["AP50"] == pytest.approx(1.0)
    assert stats["AP75"] == pytest.approx(0.0)
    assert stats["AR100"] == pytest.approx(0.5)
    assert stats["APs"] == stats["APm"] == -1  # no ground truth of those sizes


def test_wrong_class_detection_halves_the_precision_of_its_class(tmp_path):
    # Objects A (category 3) and B (category 7). Category 3: one exact detection, AP 1. Category 7:
    # a detection of A labelled 7 (score 0.8, false positive) ranked above the exact one of B
    # (0.7): precision 1/2 at recall 1, interpolated to 1/2 at every recall point, so AP 1/2 at
    # every threshold. The mean over the two categories is 3/4. Category 12 has no ground truth
    # and does not count.
    gt = write_ground_truth(tmp_path, [(4, 100, 100)],
                            [(4, 3, (10, 10, 40, 40), 0), (4, 7, (60, 50, 30, 40), 0)])
    results = [
        {"image_id": 4, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 4, "category_id": 7, "bbox": [10, 10, 40, 40], "score": 0.8},
        {"image_id": 4, "category_id": 7, "bbox": [60, 50, 30, 40], "score": 0.7},
    ]
    stats = evaluate(gt, results)
    assert stats["AP"] == pytest.approx(0.75)
    assert stats["AP50"] == pytest.approx(0.75)
    assert stats["AR100"] == pytest.approx(1.0)
    assert stats["AR1"] == pytest.approx(0.5)  # category 7's top detection is the wrong one


def test_no_detections_gives_zeros(ground_truth):
    stats = evaluate(ground_truth, [])
    for key in STAT_KEYS:  # the ground truth has objects of every size, so no row is -1
        assert stats[key] == 0.0, key
    assert stats["summary"].startswith(" No detections")
    assert len(stats["summary"].splitlines()) == 13
    # The same as a detector whose only detection is a false positive.
    false_positive = {"image_id": 9, "category_id": 3, "bbox": [1, 1, 20, 20], "score": 0.5}
    assert ({k: v for k, v in evaluate(ground_truth, [false_positive]).items() if k != "summary"}
            == {k: v for k, v in stats.items() if k != "summary"})


def test_image_ids_restrict_the_evaluation(ground_truth):
    only_image_2 = [{"image_id": 2, "category_id": 12, "bbox": list(xywh), "score": 0.9}
                    for i, _, xywh, _ in ANNOTATIONS if i == 2]
    assert evaluate(ground_truth, only_image_2)["AP"] < 1  # images 1 and 5 count as missed
    assert evaluate(ground_truth, only_image_2, image_ids=[2])["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[77\] are not in it"):
        evaluate(ground_truth, only_image_2, image_ids=[2, 77])


def test_max_dets_above_100_are_reported(tmp_path):
    # 120 objects of 10x10 (small) in one image, each detected exactly. Keeping 100 detections
    # reaches recall 100/120: precision 1 at the recall points 0.00..0.83 (84 of 101), 0 beyond,
    # so AP = 84/101. Keeping 300 finds all: AP 1.
    objects = [(4, 3, (12 * (k % 15), 12 * (k // 15), 10, 10), 0) for k in range(120)]
    gt = write_ground_truth(tmp_path, [(4, 200, 200)], objects)
    results = [{"image_id": 4, "category_id": 3, "bbox": list(xywh), "score": 1 - k / 1000}
               for k, (_, _, xywh, _) in enumerate(objects)]

    default = evaluate(gt, results)
    assert default["AP"] == pytest.approx(84 / 101)
    assert default["APs"] == pytest.approx(84 / 101)
    assert (default["AR1"], default["AR10"], default["AR100"]) == pytest.approx(
        (1 / 120, 10 / 120, 100 / 120))

    stats = evaluate(gt, results, max_dets=(1, 10, 300))
    assert set(stats) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR300",
                          "ARs", "ARm", "ARl", "summary"}
    assert stats["AP"] == stats["AP50"] == stats["APs"] == pytest.approx(1.0)
    assert stats["AR300"] == stats["ARs"] == pytest.approx(1.0)
    assert (stats["AR1"], stats["AR10"]) == pytest.approx((1 / 120, 10 / 120))
    assert stats["APm"] == stats["APl"] == -1
    lines = stats["summary"].splitlines()
    assert "maxDets=300 ] = 1.000" in lines[0]
    assert all("maxDets=100" not in line for line in lines)

    # The trap this guards against: COCOeval.summarize's first row asks for maxDets=100, absent
    # from (1, 10, 300), and reports -1.
    coco = COCO(str(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        official = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results))), "bbox")
        official.params.maxDets = [1, 10, 300]
        official.evaluate()
        official.accumulate()
        official.summarize()
    assert official.stats[0] == -1

    with pytest.raises(ValueError, match="three increasing"):
        evaluate(gt, results, max_dets=(1, 300))


def test_to_coco_results_converts_boxes_and_maps_labels():
    # (10, 20, 50, 80) in an image resized by (new_h / h, new_w / w) = (2, 4): x / 4, y / 2 gives
    # (2.5, 10, 12.5, 40), i.e. [x, y, w, h] = [2.5, 10, 10, 30].
    results = to_coco_results(
        image_ids=np.array([42, -1]), boxes=np.array([[[10, 20, 50, 80], [0, 0, 1, 1]]] * 2),
        scores=np.array([[0.75, 0.5]] * 2, np.float32), labels=np.array([[1, 2]] * 2),
        valid=np.array([[1, 0]] * 2), scale=np.array([[2.0, 4.0], [1.0, 1.0]]),
        category_ids=CATEGORY_IDS)
    assert results == [{"image_id": 42, "category_id": 7, "bbox": [2.5, 10.0, 10.0, 30.0],
                        "score": 0.75}]
    assert type(results[0]["image_id"]) is int and type(results[0]["score"]) is float
    assert all(type(v) is float for v in results[0]["bbox"])


def test_to_coco_results_and_evaluate_reject_bad_inputs(ground_truth):
    good = dict(image_ids=np.array([1]), boxes=np.zeros((1, 2, 4)), scores=np.zeros((1, 2)),
                labels=np.zeros((1, 2), np.int32), valid=np.ones((1, 2), bool),
                scale=np.ones((1, 2)), category_ids=CATEGORY_IDS)
    assert len(to_coco_results(**good)) == 2
    for change, message in [
            (dict(boxes=np.zeros((1, 2, 5))), r"boxes must have shape \[B, D, 4\]"),
            (dict(scores=np.zeros((1, 3))), "scores must have shape"),
            (dict(labels=np.array([[0, 3]])), r"labels outside \[0, 3\)"),
            (dict(labels=np.zeros((1, 2))), "labels must be integer"),
            (dict(valid=np.full((1, 2), 0.5)), "valid must be a bool"),
            (dict(scale=np.ones((2,))), r"scale must have shape \[B, 2\]"),
            (dict(scale=np.zeros((1, 2))), "finite and positive"),
            (dict(boxes=np.full((1, 2, 4), np.nan)), "non-finite")]:
        with pytest.raises(ValueError, match=message):
            to_coco_results(**{**good, **change})

    # Contiguous labels that were never mapped back: COCOeval alone would silently score 0.
    unmapped = {"image_id": 1, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 0.5}
    with pytest.raises(ValueError, match=r"category ids that are not in the ground truth: \[0\]"):
        evaluate(ground_truth, [unmapped])
    with pytest.raises(ValueError, match=r"images that are not in the ground truth: \[1234\]"):
        evaluate(ground_truth, [{**unmapped, "category_id": 3, "image_id": 1234}])
    with pytest.raises(ValueError, match="'segmentation'"):
        evaluate(ground_truth, [{**unmapped, "category_id": 3}], iou_type="segm")


def l_shape(height, width, top, left, size):
    """An L of 1-pixel strokes: mask area 2 * size - 1 (small), bounding box size^2 (medium)."""
    mask = np.zeros((height, width), bool)
    mask[top:top + size, left] = True
    mask[top + size - 1, left:left + size] = True
    return mask


# pycocotools' own decode() warns under numpy 2 (its __array__ lacks a copy keyword).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_segm_uses_rle_masks_and_the_mask_area(tmp_path):
    shapes = np.stack([l_shape(100, 120, 5, 5, 40), l_shape(100, 120, 50, 70, 40)])
    rles = masks_to_rle(shapes)
    from pycocotools import mask as mask_utils
    decoded = mask_utils.decode([{**r, "counts": r["counts"].encode()} for r in rles])
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), shapes)  # no Fortran-order mix-up
    json.dumps(rles)  # serialisable

    gt_path = tmp_path / "segm_gt.json"
    gt_path.write_text(json.dumps({
        "images": [{"id": 4, "height": 100, "width": 120}],
        "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS],
        "annotations": [{"id": 1, "image_id": 4, "category_id": 3, "segmentation": rles[0],
                         "area": 79, "bbox": [5, 5, 40, 40], "iscrowd": 0}]}))
    exact = {"image_id": 4, "category_id": 3, "segmentation": rles[0], "score": 0.5,
             "bbox": [5.0, 5.0, 40.0, 40.0]}  # mmdet-style results carry a box as well
    assert evaluate(gt_path, [exact], iou_type="segm")["AP"] == pytest.approx(1.0)

    # A false positive L (mask area 79: small; box area 1600: medium) above the true one. By mask
    # area it counts in the small range: precision 1/2 at recall 1 -> APs 1/2. Had the box area
    # been used (loadRes does when a bbox is present) it would be ignored there and APs be 1.
    wrong = {**exact, "segmentation": rles[1], "score": 0.9, "bbox": [70.0, 50.0, 40.0, 40.0]}
    stats = evaluate(gt_path, [exact, wrong], iou_type="segm")
    assert stats["APs"] == pytest.approx(0.5)
    assert stats["AP"] == pytest.approx(0.5)
    assert stats["APm"] == -1


def test_write_results_is_atomic_and_serialises_numpy(tmp_path):
    path = tmp_path / "detections.json"
    path.write_text("old")
    write_results(path, [{"image_id": np.int64(3), "score": np.float32(0.5),
                          "bbox": np.array([1.0, 2.0, 3.0, 4.0])}])
    assert json.loads(path.read_text()) == [{"image_id": 3, "score": 0.5,
                                             "bbox": [1.0, 2.0, 3.0, 4.0]}]
    with pytest.raises(TypeError):
        write_results(path, [{"image_id": object()}])
    assert json.loads(path.read_text())[0]["image_id"] == 3  # the failed write left the old file
    assert os.listdir(tmp_path) == ["detections.json"]  # and no temporary file


def test_draw_detections_writes_both_panels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    names = ["cat", "dog", "bird"]
    path = draw_detections(
        image, gt_boxes=np.array([[10, 20, 40, 50], [0, 0, 5, 5]]), gt_labels=np.array([1, -1]),
        boxes=np.array([[12, 22, 42, 52], [50, 5, 70, 30]]), labels=np.array([1, 2]),
        scores=np.array([0.9, 0.1]), class_names=names, path=tmp_path / "pics" / "a.png")
    assert path == str(tmp_path / "pics" / "a.png")
    assert os.listdir(tmp_path / "pics") == ["a.png"]
    picture = np.asarray(Image.open(path))
    assert picture.shape == (60, 160, 3)
    dog = class_colour(1)
    assert tuple(picture[35, 10]) == dog  # ground truth's left edge, left panel
    assert tuple(picture[37, 80 + 12]) == dog  # prediction's left edge, right panel
    assert tuple(picture[28, 80 + 50]) == tuple(image[28, 50])  # below threshold: not drawn
    assert tuple(picture[2, 2]) == tuple(image[2, 2])  # padding ground truth (-1): not drawn
    assert tuple(picture[58, 78]) == tuple(image[58, 78])  # untouched pixels stay the image's
    assert class_colour(1) != class_colour(2)
    with pytest.raises(ValueError, match="class_names holds 3"):
        draw_detections(image, [], [], [[0, 0, 1, 1]], [3], [1.0], names, tmp_path / "b.png")


def test_denormalize_inverts_the_input_normalisation():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    padded = np.zeros((32, 32, 3), np.float32)  # padded at the bottom and right to a bucket
    padded[:30, :20] = normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
    restored = denormalize_image(padded, image_size=(30, 20))
    assert restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, pixels)
    assert denormalize_image(padded).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="must be positive and fit"):
        denormalize_image(padded, image_size=(40, 20))
