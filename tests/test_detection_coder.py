"""The delta coder against a numpy transcription of the formulas and mmdet's docstring values."""

import math

import numpy as np

from cvolution_jax.detection.coder import decode, encode


def numpy_encode(p, g, means, stds):
    px, py = (p[:, 0] + p[:, 2]) / 2, (p[:, 1] + p[:, 3]) / 2
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gx, gy = (g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    d = np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], 1)
    return (d - np.array(means)) / np.array(stds)


def random_boxes(rng, n):
    xy = rng.uniform(0, 100, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)


def test_encode_matches_numpy_and_round_trips():
    rng = np.random.default_rng(0)
    proposals, gt = random_boxes(rng, 20), random_boxes(rng, 20)
    for means, stds in [((0, 0, 0, 0), (0.1, 0.1, 0.2, 0.2)), ((0.1, -0.2, 0.0, 0.3), (1, 1, 1, 1))]:
        deltas = encode(proposals, gt, means, stds)
        np.testing.assert_allclose(
            deltas, numpy_encode(proposals.astype(np.float64), gt.astype(np.float64), means, stds),
            rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(decode(proposals, deltas, means, stds), gt, rtol=1e-5, atol=1e-3)


def test_hand_values():
    proposal = np.array([[0, 0, 10, 20]], np.float32)  # centre (5, 10), size 10 x 20
    gt = np.array([[1, 2, 21, 22]], np.float32)        # centre (11, 12), size 20 x 20
    expected = [0.6 / 0.1, 0.1 / 0.1, math.log(2) / 0.2, 0.0]
    np.testing.assert_allclose(encode(proposal, gt)[0], expected, rtol=1e-5, atol=1e-6)


def test_decode_matches_mmdet_docstring_example():
    # delta2bbox's docstring in mmdet/core/bbox/coder/delta_xywh_bbox_coder.py (means 0, stds 1).
    rois = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [5, 5, 5, 5]], np.float32)
    deltas = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 2, -1], [0.7, -1.9, -0.5, 0.3]],
                      np.float32)
    expected = [[0, 0, 1, 1], [0.1409, 0.1409, 2.8591, 2.8591],
                [0, 0.3161, 4.1945, 0.6839], [5, 5, 5, 5]]
    out = decode(rois, deltas, stds=(1, 1, 1, 1), max_shape=(32, 32, 3))
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_size_deltas_clamp_at_log_1000_over_16():
    proposal = np.array([[0, 0, 16, 16]], np.float32)
    deltas = np.array([[0, 0, 100, -100]], np.float32)
    box = np.asarray(decode(proposal, deltas, stds=(1, 1, 1, 1)))[0]
    np.testing.assert_allclose(box[2] - box[0], 1000, rtol=1e-5)  # 16 * exp(log(1000/16))
    np.testing.assert_allclose(box[3] - box[1], 16 * 16 / 1000, rtol=1e-5)
    np.testing.assert_allclose([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], [8, 8], rtol=1e-6)


def test_decode_clips_to_max_shape_and_broadcasts_over_classes():
    proposals = np.array([[10, 10, 30, 30]], np.float32)[:, None, :]  # [N, 1, 4]
    deltas = np.array([[[0, 0, 0, 0], [5, 5, 0, 0]]], np.float32)     # [N, C, 4]
    out = decode(proposals, deltas, stds=(1, 1, 1, 1), max_shape=(40, 50))
    np.testing.assert_allclose(out, [[[10, 10, 30, 30], [50, 40, 50, 40]]])
