"""RPN: anchor validity, losses and proposals against numpy written here."""

import jax.numpy as jnp
import numpy as np

from cvolution_jax.detection import rpn
from cvolution_jax.detection.anchors import anchors_for_levels
from tests.conftest import numpy_nms


def test_anchor_valid_marks_cells_of_the_unpadded_image():
    strides, sizes, num_anchors = (4, 8), [(5, 6), (3, 3)], 2
    valid = np.asarray(rpn.anchor_valid(num_anchors, strides, sizes, jnp.asarray([13, 17])))
    expected = []
    for stride, (h, w) in zip(strides, sizes):
        for y in range(h):
            for x in range(w):
                inside = y < np.ceil(13 / stride) and x < np.ceil(17 / stride)
                expected += [inside] * num_anchors
    assert valid.tolist() == expected


def test_loss_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 10)).astype(np.float32)
    deltas = rng.normal(size=(2, 10, 4)).astype(np.float32)
    indices = rng.integers(0, 10, (2, 4)).astype(np.int32)
    is_pos = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], bool)
    sampled = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    targets = rng.normal(size=(2, 4, 4)).astype(np.float32)
    cls, reg = rpn.loss(logits, deltas, indices, is_pos, sampled, targets)
    bce, l1 = 0.0, 0.0
    for b in range(2):
        for s in range(4):
            if not sampled[b, s]:
                continue
            z, y = logits[b, indices[b, s]], float(is_pos[b, s])
            p = 1 / (1 + np.exp(-z))
            bce -= y * np.log(p) + (1 - y) * np.log(1 - p)
            if is_pos[b, s]:
                l1 += np.abs(deltas[b, indices[b, s]] - targets[b, s]).sum()
    np.testing.assert_allclose(float(cls), bce / 7, rtol=1e-5)
    np.testing.assert_allclose(float(reg), l1 / 7, rtol=1e-5)


def numpy_decode(anchor, delta):
    cx, cy = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
    w, h = anchor[2] - anchor[0], anchor[3] - anchor[1]
    dw, dh = np.clip(delta[2:], -np.log(1000 / 16), np.log(1000 / 16))
    gx, gy, gw, gh = cx + w * delta[0], cy + h * delta[1], w * np.exp(dw), h * np.exp(dh)
    return np.array([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2])


def test_proposals_against_numpy():
    image, size = (32, 48), np.array([30, 41])
    per_level = [np.asarray(a) for a in anchors_for_levels(image, strides=(8, 16), scale=2)]
    anchors = np.concatenate(per_level)
    counts = [len(a) for a in per_level]
    rng = np.random.default_rng(1)
    logits = rng.normal(size=len(anchors)).astype(np.float32)
    deltas = (rng.normal(size=(len(anchors), 4)) * 0.3).astype(np.float32)
    valid = rng.random(len(anchors)) > 0.1
    boxes, kept = rpn.proposals(jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(anchors), jnp.asarray(valid),
                                counts, jnp.asarray(size), nms_pre=20, max_proposals=15, iou_threshold=0.5)

    candidates, scores, levels = [], [], []
    start = 0
    for level, count in enumerate(counts):
        level_logits = np.where(valid[start:start + count], logits[start:start + count], -np.inf)
        for i in sorted(range(count), key=lambda i: (-level_logits[i], i))[:20]:
            box = numpy_decode(anchors[start + i].astype(np.float64), deltas[start + i].astype(np.float64))
            box = np.clip(box, 0, [size[1], size[0], size[1], size[0]])
            if level_logits[i] > -np.inf and box[2] > box[0] and box[3] > box[1]:
                candidates.append(box), scores.append(level_logits[i]), levels.append(level)
        start += count
    order = numpy_nms(np.array(candidates), np.array(scores), np.array(levels), 0.5, 15)
    assert int(kept.sum()) == len(order)
    np.testing.assert_allclose(np.asarray(boxes)[: len(order)], np.array(candidates)[order], rtol=1e-4, atol=1e-3)
    assert (np.asarray(boxes)[len(order):] == 0).all()
