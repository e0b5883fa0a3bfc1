"""R-CNN box head: targets, losses and test-time detections against numpy written here."""

import jax
import jax.numpy as jnp
import numpy as np

from cvolution_jax.detection import roi_head
from tests.conftest import numpy_iou, numpy_nms


def test_targets_label_positives_and_background():
    gt = jnp.asarray([[10, 10, 30, 30], [40, 40, 60, 70], [0, 0, 0, 0]], jnp.float32)
    labels = jnp.asarray([2, 0, -1], jnp.int32)
    gt_valid = jnp.asarray([True, True, False])
    proposals = jnp.asarray([[11, 10, 31, 30], [40, 42, 60, 70], [100, 100, 120, 120], [0, 0, 5, 5]], jnp.float32)
    target = roi_head.targets(jax.random.key(0), proposals, jnp.ones(4, bool), gt, labels, gt_valid, num_classes=3,
                              num_samples=8, pos_fraction=0.5)
    rois = np.asarray(target["rois"])
    for roi, label, is_pos, sampled, delta in zip(rois, *(np.asarray(target[k]) for k in ("labels", "is_pos", "sampled", "deltas"))):
        if not sampled:
            continue
        ious = [numpy_iou(roi, g) for g in np.asarray(gt)[:2]]
        if is_pos:
            best = int(np.argmax(ious))
            assert ious[best] >= 0.5 and label == [2, 0][best]
            g = np.asarray(gt)[best]
            w, h = roi[2] - roi[0], roi[3] - roi[1]
            expected = [((g[0] + g[2]) - (roi[0] + roi[2])) / 2 / w / 0.1, ((g[1] + g[3]) - (roi[1] + roi[3])) / 2 / h / 0.1,
                        np.log((g[2] - g[0]) / w) / 0.2, np.log((g[3] - g[1]) / h) / 0.2]
            np.testing.assert_allclose(delta, expected, atol=1e-5)
        else:
            assert max(ious) < 0.5 and label == 3
            np.testing.assert_array_equal(delta, 0)
    # 2 GT joined as proposals + 2 matching proposals = 4 positives, all taken (4 <= 8 * 0.5).
    assert int(np.asarray(target["is_pos"]).sum()) == 4
    assert int(np.asarray(target["sampled"]).sum()) == 6


def test_loss_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4)).astype(np.float32)  # 3 classes + background
    deltas = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    target = {
        "labels": np.array([[0, 3, 2], [3, 1, 3]], np.int32),
        "is_pos": np.array([[1, 0, 1], [0, 1, 0]], bool),
        "sampled": np.array([[1, 1, 1], [1, 1, 0]], bool),
        "deltas": rng.normal(size=(2, 3, 4)).astype(np.float32),
    }
    cls, reg, accuracy = roi_head.loss(jnp.asarray(logits), jnp.asarray(deltas), {k: jnp.asarray(v) for k, v in target.items()})
    ce = l1 = correct = 0.0
    for b in range(2):
        for r in range(3):
            if not target["sampled"][b, r]:
                continue
            z = logits[b, r].astype(np.float64)
            label = target["labels"][b, r]
            ce -= z[label] - np.log(np.exp(z).sum())
            correct += z.argmax() == label
            if target["is_pos"][b, r]:
                l1 += np.abs(deltas[b, r, label] - target["deltas"][b, r]).sum()
    np.testing.assert_allclose([float(cls), float(reg), float(accuracy)], [ce / 5, l1 / 5, correct / 5], rtol=1e-5)


def test_detections_against_numpy():
    rng = np.random.default_rng(2)
    num_rois, num_classes = 12, 3
    xy = rng.uniform(0, 40, (num_rois, 2))
    rois = np.concatenate([xy, xy + rng.uniform(8, 30, (num_rois, 2))], 1).astype(np.float32)
    logits = (rng.normal(size=(num_rois, num_classes + 1)) * 2).astype(np.float32)
    deltas = (rng.normal(size=(num_rois, num_classes, 4)) * 0.5).astype(np.float32)
    roi_valid = np.arange(num_rois) < 10
    size = np.array([50, 60])
    out = roi_head.detections(jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(rois), jnp.asarray(roi_valid),
                              jnp.asarray(size), score_threshold=0.1, iou_threshold=0.5, max_detections=8, nms_pre=1000)

    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    boxes, scores, classes = [], [], []
    for r in range(num_rois):
        for c in range(num_classes):
            if not roi_valid[r] or probs[r, c] <= 0.1:
                continue
            roi, d = rois[r].astype(np.float64), deltas[r, c].astype(np.float64) * [0.1, 0.1, 0.2, 0.2]
            w, h = roi[2] - roi[0], roi[3] - roi[1]
            cx, cy = roi[0] + w / 2 + w * d[0], roi[1] + h / 2 + h * d[1]
            gw, gh = w * np.exp(d[2]), h * np.exp(d[3])
            box = np.clip([cx - gw / 2, cy - gh / 2, cx + gw / 2, cy + gh / 2], 0, [60, 50, 60, 50])
            boxes.append(box), scores.append(probs[r, c]), classes.append(c)
    # Candidates in (RoI, class) order, as the detector flattens them, so NMS ties break the same way.
    keep = numpy_nms(np.array(boxes), np.array(scores, np.float32), np.array(classes), 0.5, 8)
    valid = np.asarray(out["valid"])
    assert valid.sum() == len(keep) and valid[: len(keep)].all()
    np.testing.assert_allclose(np.asarray(out["boxes"])[: len(keep)], np.array(boxes)[keep], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(out["scores"])[: len(keep)], np.array(scores)[keep], rtol=1e-5)
    assert np.asarray(out["labels"])[: len(keep)].tolist() == np.array(classes)[keep].tolist()
