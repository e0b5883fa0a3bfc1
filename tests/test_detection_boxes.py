"""box_iou and clip_boxes against a numpy double loop and hand values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax.detection.boxes import box_iou, clip_boxes


def numpy_iou(a, b):
    out = np.zeros((len(a), len(b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(a):
        for j, (bx1, by1, bx2, by2) in enumerate(b):
            iw = max(min(ax2, bx2) - max(ax1, bx1), 0.0)
            ih = max(min(ay2, by2) - max(ay1, by1), 0.0)
            inter = iw * ih
            union = max(ax2 - ax1, 0) * max(ay2 - ay1, 0) + max(bx2 - bx1, 0) * max(by2 - by1, 0) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def random_boxes(rng, n, size=50.0):
    xy = rng.uniform(-10, size, (n, 2))
    wh = rng.uniform(0, 30, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_iou_matches_numpy_loop():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    np.testing.assert_allclose(box_iou(a, b), numpy_iou(a, b), rtol=1e-5, atol=1e-6)


def test_iou_hand_values_no_plus_one():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10], [0, 0, 5, 5]], np.float32)
    # Half-overlap: 50 / 150. Touching edges: 0 (a "+1" convention would give 11/231).
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 1 / 3, 0.0, 0.25]], rtol=1e-6)


def test_zero_area_boxes_give_zero_not_nan_and_finite_gradient():
    a = np.array([[3, 3, 3, 3], [0, 0, 10, 10], [2, 2, 2, 8]], np.float32)
    iou = box_iou(a, a)
    expected = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(iou, expected)
    grad = jax.grad(lambda x: box_iou(x, x).sum())(jnp.asarray(a))
    assert np.isfinite(grad).all()


def test_iou_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        box_iou(np.zeros((3, 5)), np.zeros((2, 4)))


def test_clip_boxes():
    boxes = np.array([[-5, -3, 30, 12], [2, 3, 4, 5], [50, 60, 70, 80]], np.float32)
    np.testing.assert_array_equal(
        clip_boxes(boxes, 10, 20), [[0, 0, 20, 10], [2, 3, 4, 5], [20, 10, 20, 10]])
