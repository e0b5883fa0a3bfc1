"""assign / sample / with_gt_* against numpy transcriptions of mmdet v2's MaxIoUAssigner,
RandomSampler and add_gt_as_proposals (which drop padding and invalid boxes first, as mmdet
never sees them)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvolution_jax.detection.assign import assign, sample, with_gt_assignment, with_gt_proposals
from cvolution_jax.detection.boxes import box_iou

RPN = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
RCNN = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False)


def numpy_assign(boxes, gt, gt_valid, pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality,
                 box_valid=None):
    """mmdet's assign_wrt_overlaps on the valid boxes and GT only, mapped back to all rows.

    IoU comes from box_iou (the project's one IoU; its own tests check it): this checks the
    assignment logic, with the same float32 overlaps and so the same exact ties."""
    gt_rows = np.flatnonzero(gt_valid)
    box_rows = np.arange(len(boxes)) if box_valid is None else np.flatnonzero(box_valid)
    num_gts, num_bboxes = len(gt_rows), len(box_rows)
    assigned_gt_inds = np.full(num_bboxes, -1)
    if num_gts == 0:
        assigned_gt_inds[:] = 0
    elif num_bboxes > 0:
        # [G, N]; box_iou on all rows, then selected, so its compiled shapes are reused.
        overlaps = np.asarray(box_iou(gt, boxes))[gt_rows][:, box_rows]
        max_overlaps, argmax_overlaps = overlaps.max(0), overlaps.argmax(0)
        gt_max_overlaps = overlaps.max(1)
        if isinstance(neg_iou_thr, tuple):
            assigned_gt_inds[(max_overlaps >= neg_iou_thr[0])
                             & (max_overlaps < neg_iou_thr[1])] = 0
        else:
            assigned_gt_inds[(max_overlaps >= 0) & (max_overlaps < neg_iou_thr)] = 0
        pos_inds = max_overlaps >= pos_iou_thr
        assigned_gt_inds[pos_inds] = argmax_overlaps[pos_inds] + 1
        if match_low_quality:
            for i in range(num_gts):
                if gt_max_overlaps[i] >= min_pos_iou:
                    assigned_gt_inds[overlaps[i, :] == gt_max_overlaps[i]] = i + 1
    matched = np.zeros(len(boxes), int)
    state = np.full(len(boxes), -1)
    state[box_rows] = np.sign(assigned_gt_inds)
    positive = assigned_gt_inds > 0
    matched[box_rows[positive]] = gt_rows[assigned_gt_inds[positive] - 1]
    return matched, state


@functools.partial(jax.jit, static_argnames=("neg_iou_thr", "match_low_quality"))
def jit_assign(boxes, gt, gt_valid, box_valid, pos_iou_thr, neg_iou_thr, min_pos_iou,
               match_low_quality):
    return assign(boxes, gt, gt_valid, box_valid=box_valid, pos_iou_thr=pos_iou_thr,
                  neg_iou_thr=neg_iou_thr, min_pos_iou=min_pos_iou,
                  match_low_quality=match_low_quality)


def check_assign(boxes, gt, gt_valid, box_valid=None, **config):
    matched, state = jit_assign(boxes, gt, gt_valid, box_valid, **config)
    assert matched.dtype == state.dtype == jnp.int32
    expected_matched, expected_state = numpy_assign(boxes, gt, gt_valid, box_valid=box_valid,
                                                    **config)
    np.testing.assert_array_equal(state, expected_state)
    np.testing.assert_array_equal(matched, expected_matched)
    return np.asarray(matched), np.asarray(state)


def random_case(rng, num_boxes=60, num_gt=6, num_padding=2):
    gt_xy = rng.uniform(0, 80, (num_gt, 2))
    gt = np.concatenate([gt_xy, gt_xy + rng.uniform(8, 40, (num_gt, 2))], 1)
    # Boxes are jittered GT copies (positives at every IoU) and random boxes.
    src = gt[rng.integers(0, num_gt, num_boxes // 2)]
    size = src[:, 2:] - src[:, :2]
    jitter = rng.normal(0, 0.15, (num_boxes // 2, 4)) * np.concatenate([size, size], 1)
    xy = rng.uniform(-10, 100, (num_boxes - num_boxes // 2, 2))
    boxes = np.concatenate([src + jitter, np.concatenate(
        [xy, xy + rng.uniform(2, 50, xy.shape)], 1)])
    gt = np.concatenate([gt, rng.uniform(0, 50, (num_padding, 4))])  # padding: any values
    gt[num_gt:num_gt + 1] = boxes[0]  # ... even a box's exact copy: IoU 1, still never matched
    gt_valid = np.arange(num_gt + num_padding) < num_gt
    perm = rng.permutation(len(gt))  # padding rows anywhere
    return boxes.astype(np.float32), gt[perm].astype(np.float32), gt_valid[perm]


@pytest.mark.parametrize("config", [RPN, RCNN, dict(RPN, neg_iou_thr=(0.1, 0.3))],
                         ids=["rpn", "rcnn", "neg-range"])
def test_random_boxes_match_mmdet_loop(config):
    rng = np.random.default_rng(0)
    counts = np.zeros(3, int)
    for _ in range(8):
        boxes, gt, gt_valid = random_case(rng)
        matched, state = check_assign(boxes, gt, gt_valid, **config)
        box_valid = rng.uniform(size=len(boxes)) < 0.8
        check_assign(boxes, gt, gt_valid, box_valid=box_valid, **config)
        assert gt_valid[matched[state == 1]].all()  # padding GT never matched
        counts += np.bincount(state + 1, minlength=3)
    # Negative and positive boxes all occurred, and ignored ones where the thresholds differ.
    assert (counts[1:] > 0).all() and (counts[0] > 0) == (config is not RCNN)


def test_no_valid_gt_means_all_negative():
    rng = np.random.default_rng(1)
    boxes, gt, _ = random_case(rng, num_boxes=10)
    none = np.zeros(len(gt), bool)
    for config in (RPN, RCNN):
        matched, state = check_assign(boxes, gt, none, **config)
        assert (state == 0).all() and (matched == 0).all()
    box_valid = np.arange(10) % 3 > 0
    _, state = check_assign(boxes, gt, none, box_valid=box_valid, **RPN)
    assert state.tolist() == np.where(box_valid, 0, -1).tolist()
    matched, state = assign(boxes, np.zeros((0, 4), np.float32), np.zeros(0, bool), **RPN)
    assert (np.asarray(state) == 0).all() and (np.asarray(matched) == 0).all()


def test_padding_gt_is_never_matched():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 11]], np.float32)
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    matched, state = check_assign(boxes, gt, np.array([False, True]), **RPN)
    # Box 0 is an exact copy of the padding GT and overlaps the valid one not at all.
    assert state.tolist() == [0, 1, 0] and matched.tolist() == [0, 1, 0]


def test_low_quality_matching_ties_and_overwrites():
    gt = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [0, 0, 10, 10], [50, 0, 60, 10]],
                  np.float32)
    boxes = np.array([
        [0, 0, 10, 20],  # IoU 0.5 with GT 0 and 2 (identical GTs)
        [0, 0, 20, 10],  # the same IoU 0.5: a tie, both are best for GT 0 / 2
        [100, 100, 110, 125],  # IoU 0.4 with GT 1: its best, below 0.7 but >= 0.3
        [0, 0, 10, 40],  # IoU 0.25 with GT 0 and 2
        [50, 0, 60, 50],  # IoU 0.2 with GT 3, its best: below min_pos_iou 0.3
    ], np.float32)
    valid = np.ones(4, bool)
    matched, state = check_assign(boxes, gt, valid, **RPN)
    # The tied boxes both go to the *later* of the identical GTs (mmdet's loop overwrites).
    assert state.tolist() == [1, 1, 1, 0, 0] and matched.tolist()[:3] == [2, 2, 1]
    _, state = check_assign(boxes, gt, valid, **dict(RPN, match_low_quality=False))
    assert state.tolist() == [-1, -1, -1, 0, 0]
    # Low quality matching overrides the argmax: box 0 has IoU 0.9 with GT 0 and 0.89 with
    # GT 1; GT 1's best box is box 0 (GT 0's is box 1, IoU 0.92).
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 12.5]], np.float32)
    boxes = np.array([[0, 0, 10, 11.1111], [0, 0, 10, 9.2]], np.float32)
    matched, state = check_assign(boxes, gt, np.ones(2, bool), **dict(RPN, pos_iou_thr=0.5))
    assert state.tolist() == [1, 1] and matched.tolist() == [1, 0]


def test_thresholds_at_equality():
    # pos: IoU >= pos_iou_thr; neg: IoU < neg_iou_thr (an IoU of exactly 0.3 is ignored).
    gt = np.array([[0, 0, 10, 10]], np.float32)
    boxes = np.array([[0, 0, 10, 7], [0, 0, 10, 3], [0, 0, 10, 2.9], [0, 0, 10, 5]], np.float32)
    _, state = check_assign(boxes, gt, np.ones(1, bool), **RPN)
    assert state.tolist() == [1, -1, 0, -1]
    _, state = check_assign(boxes, gt, np.ones(1, bool), **RCNN)
    assert state.tolist() == [1, 0, 0, 1]


def test_invalid_boxes_take_no_part_in_gt_best_overlap():
    gt = np.array([[0, 0, 10, 10]], np.float32)
    boxes = np.array([[0, 0, 10, 12], [0, 0, 10, 25]], np.float32)  # IoU 0.83 and 0.4
    valid = np.array([False, True])
    matched, state = check_assign(boxes, gt, np.ones(1, bool), box_valid=valid, **RPN)
    assert state.tolist() == [-1, 1]  # box 1 is now the GT's best box: a low-quality positive
    _, state = check_assign(boxes, gt, np.ones(1, bool), **RPN)
    assert state.tolist() == [1, -1]


def numpy_sample_counts(state, num, pos_fraction):
    num_pos = min(int(num * pos_fraction), int((state == 1).sum()))
    return num_pos, min(num - num_pos, int((state == 0).sum()))


def check_sample(key, state, num, pos_fraction):
    indices, is_pos, valid = (np.asarray(a) for a in sample(key, state, num, pos_fraction))
    assert indices.shape == is_pos.shape == valid.shape == (num,)
    assert indices.dtype == np.int32
    num_pos, num_neg = numpy_sample_counts(state, num, pos_fraction)
    assert is_pos.tolist() == [True] * num_pos + [False] * (num - num_pos)
    assert valid.tolist() == [True] * (num_pos + num_neg) + [False] * (num - num_pos - num_neg)
    assert (state[indices[:num_pos]] == 1).all()
    assert (state[indices[num_pos:num_pos + num_neg]] == 0).all()
    assert len(set(indices[valid].tolist())) == num_pos + num_neg  # no duplicates
    assert (indices[~valid] == 0).all()
    return indices, num_pos, num_neg


@pytest.mark.parametrize("num_pos,num_neg,num_ignored,num,pos_fraction", [
    (3, 100, 10, 16, 0.5),  # few positives: negatives fill up
    (200, 1000, 0, 64, 0.25),  # plenty of both
    (0, 5, 3, 8, 0.5),  # too few of anything: padding slots
    (6, 1, 2, 8, 0.5),  # too few negatives
    (4, 4, 0, 16, 0.5),  # fewer boxes than slots (top_k's k is capped at N)
    (5, 5, 0, 10, 0.0),  # no positives wanted
    (5, 5, 0, 10, 1.0),  # no negatives wanted, but positives run out
])
def test_sample_counts(num_pos, num_neg, num_ignored, num, pos_fraction):
    rng = np.random.default_rng(num_pos + num_neg)
    state = rng.permutation(np.repeat([1, 0, -1], [num_pos, num_neg, num_ignored]))
    for seed in range(3):
        check_sample(jax.random.key(seed), state, num, pos_fraction)


def test_sample_is_uniform_and_jits():
    state = np.repeat([1, 0, -1], [10, 20, 5])
    num, pos_fraction, draws = 8, 0.25, 400
    keys = jax.random.split(jax.random.key(0), draws)
    indices, is_pos, valid = jax.jit(jax.vmap(lambda k: sample(k, state, num, pos_fraction)))(
        keys)
    indices, is_pos, valid = np.asarray(indices), np.asarray(is_pos), np.asarray(valid)
    assert is_pos.sum(1).tolist() == [2] * draws and valid.all()
    counts = np.bincount(indices.ravel(), minlength=len(state))
    # Each positive is chosen with probability 2/10, each negative 6/20: expected 80 and 120 of
    # 400 draws (std ~8 and ~9).
    assert (counts[:10] > 50).all() and (counts[:10] < 110).all()
    assert (counts[10:30] > 85).all() and (counts[10:30] < 155).all()
    assert (counts[30:] == 0).all()
    for k in range(5):  # and the draws differ
        assert len({tuple(row) for row in indices[k::5][:20]}) > 15


def test_rcnn_flow_with_gt_as_proposals():
    rng = np.random.default_rng(3)
    proposals, gt, gt_valid = random_case(rng, num_boxes=40)
    proposals[-3:] = 0  # padding proposals
    proposal_valid = np.arange(40) < 37
    gt[np.argmax(gt_valid)][2:] = gt[np.argmax(gt_valid)][:2]  # a degenerate GT box still counts
    matched, state = assign(proposals, gt, gt_valid, box_valid=proposal_valid, **RCNN)
    boxes, boxes_valid = with_gt_proposals(proposals, proposal_valid, gt, gt_valid)
    matched, state = with_gt_assignment(matched, state, gt_valid)
    num_gt = len(gt)
    assert boxes.shape == (num_gt + 40, 4) and matched.shape == state.shape == (num_gt + 40,)
    np.testing.assert_array_equal(boxes[:num_gt], gt)
    np.testing.assert_array_equal(boxes[num_gt:], proposals)
    np.testing.assert_array_equal(boxes_valid, np.concatenate([gt_valid, proposal_valid]))
    # mmdet: assign the proposals, then add_gt_ prepends gt_inds 1..G (the valid GT only here).
    expected_matched, expected_state = numpy_assign(proposals, gt, gt_valid,
                                                    box_valid=proposal_valid, **RCNN)
    np.testing.assert_array_equal(state, np.concatenate([np.where(gt_valid, 1, -1),
                                                         expected_state]))
    np.testing.assert_array_equal(matched[:num_gt], np.where(gt_valid, np.arange(num_gt), 0))
    np.testing.assert_array_equal(matched[num_gt:], expected_matched)
    indices, is_pos, valid = sample(jax.random.key(0), state, 32, 0.25)
    assert np.asarray(boxes_valid)[np.asarray(indices)[np.asarray(valid)]].all()
    assert (np.asarray(state)[np.asarray(indices)[np.asarray(is_pos)]] == 1).all()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"boxes \[N, 4\], gt_boxes \[G, 4\], gt_valid \[G\]"):
        assign(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(3, bool), **RPN)
    with pytest.raises(ValueError, match="neg_iou_thr"):
        assign(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(2, bool),
               **dict(RPN, neg_iou_thr=(0.1, 0.2, 0.3)))
    with pytest.raises(ValueError, match="num must be a positive int"):
        sample(jax.random.key(0), np.zeros(4, np.int32), 0, 0.5)
