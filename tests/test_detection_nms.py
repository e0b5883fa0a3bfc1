"""batched_nms against greedy NMS written in numpy (float64 IoU, classes compared, no offsets)."""

import jax
import numpy as np
import pytest

from cvolution_jax.detection.boxes import box_iou
from cvolution_jax.detection.nms import batched_nms
from tests.conftest import numpy_iou, numpy_nms


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


def per_class_nms(boxes, scores, classes, iou_threshold, max_output):
    """numpy_nms run on each class's boxes alone, the kept boxes merged in visiting order."""
    kept = []
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        same = np.zeros(len(members), np.int32)
        kept += [int(members[k]) for k in numpy_nms(boxes[members], scores[members], same,
                                                    iou_threshold, len(members))]
    return sorted(kept, key=lambda i: (-scores[i], i))[:max_output]


def test_76_classes_on_an_800x600_image_decide_on_the_image_coordinates():
    # Two boxes of class 47 with IoU 0.7000254 (0.70002536 in float64): per-class NMS at 0.7
    # suppresses the second. Offsetting classes by class * (800 + 1) puts them near x = 38,000,
    # where float32 resolves 1/256 pixel and the same IoU comes out as 0.6999894.
    pair = np.array([[494.2665100097656, 59.31547927856445, 556.7740478515625, 144.69107055664062],
                     [505.296142578125, 59.31547927856445, 567.8037109375, 144.69107055664062]],
                    np.float32)
    assert np.asarray(box_iou(pair[:1], pair[1:]))[0, 0] > 0.7
    assert numpy_iou(*pair.astype(np.float64)) > 0.7
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, [700, 500], (3 * 76, 2))
    others = np.concatenate([xy, xy + rng.uniform(10, 100, (3 * 76, 2))], 1)
    boxes = np.concatenate([[[0, 0, 800, 600]], others, pair]).astype(np.float32)
    classes = np.concatenate([[0], np.repeat(np.arange(76), 3), [47, 47]]).astype(np.int32)
    scores = np.concatenate([[0.01], rng.uniform(0.05, 0.8, 3 * 76), [0.95, 0.9]])
    scores = scores.astype(np.float32)
    first, second = len(boxes) - 2, len(boxes) - 1
    kept = check(boxes, scores, classes, 0.7, len(boxes))
    assert kept == per_class_nms(boxes, scores, classes, 0.7, len(boxes))
    assert first in kept and second not in kept


@pytest.mark.parametrize("iou_threshold", [0.5, 0.7])
def test_many_classes_near_the_threshold_equal_per_class_nms(iou_threshold):
    # Pairs of boxes in classes up to 999, each pair's IoU within 5e-5 of the threshold (on
    # either side): every decision must be the one per-class NMS makes.
    rng = np.random.default_rng(4)
    pairs = 200
    target = iou_threshold + rng.choice([-1, 1], pairs) * rng.uniform(5e-6, 5e-5, pairs)
    xy = rng.uniform(0, [700, 500], (pairs, 2))
    wh = rng.uniform(15, 100, (pairs, 2))
    shift = wh[:, 0] * (1 - target) / (1 + target)  # IoU of a horizontal shift: (w - d) / (w + d)
    first = np.concatenate([xy, xy + wh], 1)
    second = first + np.stack([shift, 0 * shift, shift, 0 * shift], 1)
    boxes = np.concatenate([[[0, 0, 800, 600]], first, second]).astype(np.float32)
    pair_classes = rng.choice(1000, pairs, replace=False)
    classes = np.concatenate([[0], pair_classes, pair_classes]).astype(np.int32)
    scores = np.concatenate([[0.01], rng.uniform(0.5, 1, pairs), rng.uniform(0.05, 0.45, pairs)])
    scores = scores.astype(np.float32)
    # Each pair is on the same side of the threshold in float32 as in float64, so the case is
    # decidable in the boxes' own coordinates.
    iou32 = np.diag(np.asarray(box_iou(boxes[1:pairs + 1], boxes[pairs + 1:])))
    iou64 = np.array([numpy_iou(a, b) for a, b in zip(boxes[1:pairs + 1].astype(np.float64),
                                                       boxes[pairs + 1:].astype(np.float64))])
    np.testing.assert_array_equal(iou32 > iou_threshold, iou64 > iou_threshold)
    assert 0 < (iou64 > iou_threshold).sum() < pairs
    kept = check(boxes, scores, classes, iou_threshold, len(boxes))
    assert kept == per_class_nms(boxes, scores, classes, iou_threshold, len(boxes))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"boxes \[N, 4\], scores \[N\]"):
        batched_nms(np.zeros((3, 4)), np.zeros(2), np.zeros(3, np.int32), 0.5, 2)
