"""batched_nms against a per-class greedy NMS written in numpy (no offset trick)."""

import jax
import numpy as np
import pytest

from cvolution_jax.detection.nms import batched_nms


def numpy_iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + max(b[2] - b[0], 0) * max(b[3] - b[1], 0) - inter
    return inter / union if union > 0 else 0.0


def numpy_nms(boxes, scores, classes, iou_threshold, max_output, valid=None):
    """The classic greedy loop, per class: visit by score (ties: lower index first)."""
    boxes = boxes.astype(np.float64)
    candidates = [i for i in range(len(scores))
                  if scores[i] > -np.inf and (valid is None or valid[i])]
    kept = []
    for i in sorted(candidates, key=lambda i: (-scores[i], i)):
        if all(classes[j] != classes[i] or numpy_iou(boxes[i], boxes[j]) <= iou_threshold
               for j in kept):
            kept.append(i)
    return kept[:max_output]


def check(boxes, scores, classes, iou_threshold, max_output, valid=None):
    indices, mask = batched_nms(boxes, scores, classes, iou_threshold, max_output, valid=valid)
    indices, mask = np.asarray(indices), np.asarray(mask)
    expected = numpy_nms(boxes, scores, classes, iou_threshold, max_output, valid)
    assert indices.shape == mask.shape == (max_output,)
    assert indices[mask].tolist() == expected
    assert mask.tolist() == [True] * len(expected) + [False] * (max_output - len(expected))
    assert (indices[~mask] == 0).all()
    return expected


def random_inputs(rng, n=40, num_classes=3):
    xy = rng.uniform(-20, 30, (n, 2))  # some boxes start left of / above the image
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).round(1).astype(np.float32)  # rounding makes many ties
    classes = rng.integers(0, num_classes, n).astype(np.int32)
    return boxes, scores, classes


def test_random_boxes_and_the_threshold_is_passed_through():
    rng = np.random.default_rng(0)
    boxes, scores, classes = random_inputs(rng)
    kept = [check(boxes, scores, classes, t, 40) for t in (0.1, 0.3, 0.5, 0.7)]
    assert len({len(k) for k in kept}) == 4  # each threshold keeps a different number of boxes


def test_threshold_may_be_traced_and_truncation_keeps_the_best():
    rng = np.random.default_rng(1)
    boxes, scores, classes = random_inputs(rng)
    nms = jax.jit(lambda t: batched_nms(boxes, scores, classes, t, 5))
    for t in (0.2, 0.6):
        indices, mask = nms(t)
        assert np.asarray(indices)[np.asarray(mask)].tolist() == numpy_nms(
            boxes, scores, classes, t, 5)
        assert np.asarray(mask).all()


def test_ties_visit_lower_index_first():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11], [30, 30, 40, 40]],
                     np.float32)
    scores = np.array([0.5, 0.5, 0.5, -0.0], np.float32)
    classes = np.zeros(4, np.int32)
    assert check(boxes, scores, classes, 0.5, 4) == [0, 3]
    scores = np.array([0.0, -0.0, 0.0, 0.0], np.float32)  # -0.0 ties with 0.0
    assert check(boxes, scores, classes, 0.5, 4) == [0, 3]


def test_classes_with_negative_coordinates_do_not_suppress_each_other():
    # Identical boxes crossing the top-left border, one per class. An offset of
    # class * (max + 1) = class * 11 (mmcv's) would give neighbouring classes IoU 0.25, and
    # suppress at 0.2.
    boxes = np.array([[-20, -20, 10, 10]] * 3 + [[5, 5, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    classes = np.array([0, 1, 2, 0], np.int32)
    assert check(boxes, scores, classes, 0.2, 6) == [0, 1, 2, 3]
    classes = np.zeros(4, np.int32)
    assert check(boxes, scores, classes, 0.2, 6) == [0, 3]


def test_everything_suppressed_but_the_best():
    boxes = np.tile(np.array([[5, 5, 25, 25]], np.float32), (6, 1)) + np.arange(6)[:, None] * 0.1
    scores = np.array([0.1, 0.9, 0.3, 0.4, 0.2, 0.5], np.float32)
    assert check(boxes, scores, np.zeros(6, np.int32), 0.5, 6) == [1]


def test_padding_slots_and_empty_input():
    rng = np.random.default_rng(2)
    boxes, scores, classes = random_inputs(rng, n=6)
    none = np.full(6, -np.inf, np.float32)
    assert check(boxes, none, classes, 0.5, 4) == []
    valid = np.array([True, False, True, False, True, False])
    check(boxes, scores, classes, 0.5, 4, valid=valid)
    scores[3] = -np.inf
    check(boxes, scores, classes, 0.5, 4)
    indices, mask = batched_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                np.zeros(0, np.int32), 0.5, 3)
    assert np.asarray(indices).tolist() == [0, 0, 0] and not np.asarray(mask).any()


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"boxes \[N, 4\], scores \[N\]"):
        batched_nms(np.zeros((3, 4)), np.zeros(2), np.zeros(3, np.int32), 0.5, 2)
