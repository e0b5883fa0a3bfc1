"""mIoU, mAcc and aAcc from one confusion matrix, against a numpy oracle written here (mmseg's
`intersect_and_union` per image, summed) on hand-made label maps."""

import numpy as np
import pytest

from cvolution_jax.segmentation import metrics


def oracle(preds, labels, num_classes, ignore=255):
    """mmseg's `total_intersect_and_union` then `total_area_to_metrics`, as loops over pixels."""
    intersect, pred_area, label_area = (np.zeros(num_classes) for _ in range(3))
    for pred, label in zip(preds, labels):
        for p, t in zip(pred.ravel(), label.ravel()):
            if t == ignore:
                continue
            pred_area[p] += 1
            label_area[t] += 1
            intersect[t] += p == t
    union = pred_area + label_area - intersect
    iou = [intersect[c] / union[c] if union[c] else np.nan for c in range(num_classes)]
    acc = [intersect[c] / label_area[c] if label_area[c] else np.nan for c in range(num_classes)]
    return {"IoU": np.asarray(iou), "Acc": np.asarray(acc), "aAcc": intersect.sum() / label_area.sum(),
            "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc)}


# Two 3x4 images, 4 classes. Class 3 appears nowhere (absent from both: left out of the means);
# class 2 is predicted once but never labelled (IoU 0 counts, Acc NaN does not); 255 is ignored,
# also where the prediction is a class that would otherwise count as a false positive.
LABELS = np.asarray([
    [[0, 0, 1, 1],
     [0, 0, 1, 255],
     [255, 0, 1, 1]],
    [[1, 1, 1, 0],
     [0, 0, 0, 0],
     [255, 255, 0, 1]],
], np.int32)
PREDS = np.asarray([
    [[0, 0, 1, 0],
     [0, 1, 1, 2],
     [2, 0, 1, 1]],
    [[1, 1, 0, 0],
     [0, 0, 2, 0],
     [1, 1, 0, 1]],
], np.int32)


def test_confusion_matrix_counts_label_prediction_pairs_and_skips_ignored_pixels():
    confusion = np.asarray(metrics.confusion_matrix(PREDS, LABELS, 4))
    expected = np.zeros((4, 4), np.int64)
    for p, t in zip(PREDS.ravel(), LABELS.ravel()):
        if t != 255:
            expected[t, p] += 1
    np.testing.assert_array_equal(confusion, expected)
    assert confusion.sum() == (LABELS != 255).sum() == 20


def test_metrics_match_the_oracle_with_an_absent_class_and_a_never_labelled_one():
    got = metrics.iou_metrics(metrics.confusion_matrix(PREDS, LABELS, 4))
    want = oracle(PREDS, LABELS, 4)
    np.testing.assert_allclose(got["IoU"], want["IoU"], equal_nan=True)
    np.testing.assert_allclose(got["Acc"], want["Acc"], equal_nan=True)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # By hand: class 0 labelled 11, predicted 11, hit 9 -> IoU 9/13; class 1 labelled 9, predicted
    # 8, hit 7 -> 7/10; class 2 predicted once, never labelled -> IoU 0, Acc NaN; class 3 -> NaN both.
    assert got["IoU"][:3] == pytest.approx([9 / 13, 7 / 10, 0.0])
    assert np.isnan(got["IoU"][3]) and np.isnan(got["Acc"][2]) and np.isnan(got["Acc"][3])
    assert got["mIoU"] == pytest.approx((9 / 13 + 7 / 10 + 0) / 3)
    assert got["mAcc"] == pytest.approx((9 / 11 + 7 / 9) / 2)
    assert got["aAcc"] == pytest.approx(16 / 20)


def test_summing_per_batch_matrices_equals_one_matrix_over_the_set():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (6, 7, 9)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.2] = 255
    preds = rng.integers(0, 5, labels.shape).astype(np.int32)
    total = sum(np.asarray(metrics.confusion_matrix(preds[i:i + 2], labels[i:i + 2], 5)) for i in range(0, 6, 2))
    np.testing.assert_array_equal(total, np.asarray(metrics.confusion_matrix(preds, labels, 5)))
    got, want = metrics.iou_metrics(total), oracle(preds, labels, 5)
    assert got["mIoU"] == pytest.approx(want["mIoU"]) and got["aAcc"] == pytest.approx(want["aAcc"])


def test_perfect_prediction_and_all_ignored_edges():
    perfect = metrics.iou_metrics(metrics.confusion_matrix(LABELS.clip(0, 3), LABELS, 4))
    assert perfect["mIoU"] == perfect["mAcc"] == perfect["aAcc"] == 1.0
    nothing = metrics.iou_metrics(metrics.confusion_matrix(PREDS, np.full_like(LABELS, 255), 4))
    assert np.isnan(nothing["mIoU"]) and np.isnan(nothing["aAcc"])


def test_table_lists_every_class_in_percent():
    table = metrics.format_table(metrics.iou_metrics(metrics.confusion_matrix(PREDS, LABELS, 4)), ("a", "b", "c", "d"))
    lines = table.splitlines()
    assert lines[1].split() == ["a", f"{100 * 9 / 13:.2f}", f"{100 * 9 / 11:.2f}"]
    assert lines[4].split() == ["d", "nan", "nan"]
    assert lines[-1] == f"aAcc 80.00  mIoU {100 * (9 / 13 + 7 / 10) / 3:.2f}  mAcc {100 * (9 / 11 + 7 / 9) / 2:.2f}"
