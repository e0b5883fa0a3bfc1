"""Target assignment and sampling with static shapes: mmdet v2's ``MaxIoUAssigner`` (with
``gt_max_assign_all=True``, no ignored GT), ``RandomSampler`` (``neg_pos_ub=-1``) and
``add_gt_as_proposals``.

Ground truth is padded to a fixed count ``G`` with a validity mask; boxes (anchors or proposals)
come with an optional validity mask too. Results are per-box states rather than index lists:
``1`` positive, ``0`` negative, ``-1`` ignored (neither, or not usable at all).

The R-CNN flow of mmdet (``StandardRoIHead.forward_train``) assigns the proposals alone, then the
sampler prepends the GT boxes as extra proposals assigned to themselves (``AssignResult.add_gt_``)::

    matched, state = assign(proposals, gt, gt_valid, box_valid=proposal_valid, pos_iou_thr=0.5,
                            neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False)
    boxes, boxes_valid = with_gt_proposals(proposals, proposal_valid, gt, gt_valid)
    matched, state = with_gt_assignment(matched, state, gt_valid)
    indices, is_pos, valid = sample(key, state, 512, 0.25)
"""

import functools

import jax
import jax.numpy as jnp

from cvolution_jax.detection.boxes import box_iou


def assign(boxes, gt_boxes, gt_valid, *, pos_iou_thr, neg_iou_thr, min_pos_iou,
           match_low_quality, box_valid=None):
    """mmdet v2's ``MaxIoUAssigner.assign`` (``gt_max_assign_all=True``).

    With IoU from ``box_iou`` (GT x boxes):

    1. every box starts ignored (-1);
    2. negative (0): ``0 <= max IoU < neg_iou_thr`` (or ``lo <= max IoU < hi`` for a tuple);
    3. positive (1): ``max IoU >= pos_iou_thr``, matched to the GT of the max (the first GT on
       ties);
    4. if ``match_low_quality``: for each GT ``i`` in order whose best IoU over the boxes is
       ``>= min_pos_iou``, every box whose IoU with it equals that best IoU becomes positive,
       matched to ``i`` (later GTs overwrite earlier ones, like mmdet's loop). Note that with
       ``min_pos_iou = 0`` a GT that overlaps no box makes every box with IoU 0 positive, as in
       mmdet.

    No valid GT: every (valid) box is negative.

    Args:
      boxes: ``[N, 4]`` anchors or proposals.
      gt_boxes: ``[G, 4]`` ground truth, padded.
      gt_valid: ``[G]`` bool; padding GT is never matched and takes no part in step 4.
      pos_iou_thr, min_pos_iou: floats (may be traced).
      neg_iou_thr: a float, or a static ``(lo, hi)`` tuple.
      match_low_quality: static bool.
      box_valid: optional ``[N]`` bool; invalid boxes are ignored (-1) and, as mmdet drops them
        before assigning (e.g. anchors outside the valid region), take no part in the GTs' best
        IoU of step 4.

    Returns:
      ``(matched_gt [N] int32, state [N] int32)``: the GT index of positives (0 elsewhere) and
      the state (1 positive, 0 negative, -1 ignored). Used by RPN with ``(0.7, 0.3,
      min_pos_iou=0.3, match_low_quality=True)`` and by the R-CNN with ``(0.5, 0.5, 0.5,
      match_low_quality=False)``.
    """
    boxes = jnp.asarray(boxes)
    gt_boxes = jnp.asarray(gt_boxes)
    gt_valid = jnp.asarray(gt_valid, bool)
    num_boxes, num_gt = boxes.shape[0], gt_boxes.shape[0]
    if (boxes.ndim != 2 or gt_boxes.ndim != 2 or gt_valid.shape != (num_gt,)
            or (box_valid is not None and jnp.shape(box_valid) != (num_boxes,))):
        raise ValueError(
            "assign takes boxes [N, 4], gt_boxes [G, 4], gt_valid [G] (and box_valid [N]); got "
            f"{boxes.shape}, {gt_boxes.shape}, {gt_valid.shape}"
            f"{'' if box_valid is None else ', ' + str(jnp.shape(box_valid))}.")
    if isinstance(neg_iou_thr, (tuple, list)):
        if len(neg_iou_thr) != 2:
            raise ValueError(f"neg_iou_thr must be a number or (lo, hi); got {neg_iou_thr!r}.")
        neg_lo, neg_hi = neg_iou_thr
    else:
        neg_lo, neg_hi = 0.0, neg_iou_thr
    if num_boxes == 0:
        return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32)
    if num_gt == 0:
        state = jnp.zeros((num_boxes,), jnp.int32)
        if box_valid is not None:
            state = jnp.where(jnp.asarray(box_valid, bool), state, -1)
        return jnp.zeros((num_boxes,), jnp.int32), state

    overlaps = box_iou(gt_boxes, boxes)  # [G, N], mmdet's layout
    # -1 is below every threshold: padding GT never wins a max, and invalid boxes never set a
    # GT's best IoU (a valid box's IoU is >= 0).
    usable = gt_valid[:, None]
    if box_valid is not None:
        box_valid = jnp.asarray(box_valid, bool)
        usable = usable & box_valid[None, :]
    overlaps = jnp.where(usable, overlaps, -1)

    max_overlaps = jnp.max(overlaps, axis=0)  # [N], -1 when no valid GT
    argmax_overlaps = jnp.argmax(overlaps, axis=0)  # first GT on ties, like torch's max
    state = jnp.full((num_boxes,), -1, jnp.int32)
    state = jnp.where((max_overlaps >= neg_lo) & (max_overlaps < neg_hi), 0, state)
    positive = max_overlaps >= pos_iou_thr
    state = jnp.where(positive, 1, state)
    matched = jnp.where(positive, argmax_overlaps, 0)

    if match_low_quality:
        gt_max_overlaps = jnp.max(overlaps, axis=1)  # [G]
        eligible = gt_valid & (gt_max_overlaps >= min_pos_iou)
        hits = eligible[:, None] & (overlaps == gt_max_overlaps[:, None])  # [G, N]
        # mmdet's loop over GTs overwrites: the last hitting GT wins.
        last = num_gt - 1 - jnp.argmax(hits[::-1], axis=0)
        hit = jnp.any(hits, axis=0)
        state = jnp.where(hit, 1, state)
        matched = jnp.where(hit, last, matched)

    no_gt = ~jnp.any(gt_valid)
    state = jnp.where(no_gt, 0, state)
    matched = jnp.where(no_gt, 0, matched)
    if box_valid is not None:
        state = jnp.where(box_valid, state, -1)
        matched = jnp.where(box_valid, matched, 0)
    return matched.astype(jnp.int32), state.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num", "pos_fraction"))
def sample(key, state, num, pos_fraction):
    """mmdet's ``RandomSampler`` (``neg_pos_ub=-1``) into ``num`` fixed slots.

    ``num_pos = min(int(num * pos_fraction), #positives)`` positives, chosen uniformly without
    replacement, then ``num_neg = min(num - num_pos, #negatives)`` negatives likewise, then
    padding. A random 31-bit priority per box and ``top_k`` over the masked priorities make the
    choice (ties, about ``N**2 / 2**32`` pairs, go to the lower index).

    Args:
      key: a PRNG key.
      state: ``[N]`` int states from ``assign`` (1 positive, 0 negative, -1 never sampled).
      num: static int, the number of slots (mmdet's ``num``).
      pos_fraction: static float, the wanted fraction of positives.

    Returns:
      ``(indices [num] int32, is_pos [num] bool, valid [num] bool)``: positives fill the first
      ``num_pos`` slots (in random order; mmdet sorts them, which no loss sees), negatives the
      next ``num_neg``, then padding slots with index 0, ``is_pos`` and ``valid`` False.
    """
    state = jnp.asarray(state)
    if state.ndim != 1:
        raise ValueError(f"state must be [N]; got shape {state.shape}.")
    if not isinstance(num, int) or num <= 0 or not 0 <= pos_fraction <= 1:
        raise ValueError(
            f"num must be a positive int and pos_fraction in [0, 1]; got {num!r}, "
            f"{pos_fraction!r}.")
    n = state.shape[0]
    slots = jnp.arange(num)
    if n == 0:
        empty = jnp.zeros((num,), bool)
        return jnp.zeros((num,), jnp.int32), empty, empty
    expected_pos = int(num * pos_fraction)
    positive, negative = state == 1, state == 0
    num_pos = jnp.minimum(expected_pos, jnp.sum(positive))
    num_neg = jnp.minimum(num - num_pos, jnp.sum(negative))
    # Positives and negatives are disjoint sets, so one draw serves both.
    priority = (jax.random.bits(key, (n,), jnp.uint32) >> 1).astype(jnp.int32)

    def ranked(mask, k):
        # The k highest-priority boxes of the mask (a uniformly random subset in random order),
        # then the others: only the first sum(mask) entries are used.
        return jax.lax.top_k(jnp.where(mask, priority, -1), k)[1]

    is_pos = slots < num_pos
    is_neg = (slots >= num_pos) & (slots < num_pos + num_neg)
    indices = jnp.zeros((num,), jnp.int32)
    if min(expected_pos, n) > 0:
        k = min(expected_pos, n)
        indices = jnp.where(is_pos, ranked(positive, k)[jnp.clip(slots, 0, k - 1)], indices)
    k = min(num, n)
    neg_order = ranked(negative, k)
    indices = jnp.where(is_neg, neg_order[jnp.clip(slots - num_pos, 0, k - 1)], indices)
    return indices.astype(jnp.int32), is_pos, is_pos | is_neg


def with_gt_proposals(proposals, proposal_valid, gt_boxes, gt_valid):
    """mmdet's ``add_gt_as_proposals``: GT boxes prepended to the proposals.

    Args:
      proposals: ``[P, 4]``; proposal_valid: ``[P]`` bool.
      gt_boxes: ``[G, 4]``; gt_valid: ``[G]`` bool (padding GT becomes an invalid proposal).

    Returns:
      ``(boxes [G + P, 4], valid [G + P])``, GT first as mmdet concatenates. Pair it with
      ``with_gt_assignment`` on the proposals' assignment (see the module docstring).
    """
    proposals = jnp.asarray(proposals)
    gt_boxes = jnp.asarray(gt_boxes)
    dtype = jnp.result_type(proposals, gt_boxes)
    boxes = jnp.concatenate([gt_boxes.astype(dtype), proposals.astype(dtype)], axis=0)
    valid = jnp.concatenate([jnp.asarray(gt_valid, bool), jnp.asarray(proposal_valid, bool)])
    return boxes, valid


def with_gt_assignment(matched_gt, state, gt_valid):
    """mmdet's ``AssignResult.add_gt_``: the assignment of ``with_gt_proposals``' boxes.

    Each GT proposal is positive and matched to its own GT, whatever its IoU (a degenerate or
    duplicated GT box too, which assigning the concatenation with ``assign`` would not ensure);
    padding GT rows are ignored.

    Args:
      matched_gt, state: ``[P]`` from ``assign`` on the proposals alone.
      gt_valid: ``[G]`` bool.

    Returns:
      ``(matched_gt [G + P] int32, state [G + P] int32)``.
    """
    gt_valid = jnp.asarray(gt_valid, bool)
    num_gt = gt_valid.shape[0]
    gt_matched = jnp.where(gt_valid, jnp.arange(num_gt), 0)
    matched = jnp.concatenate([gt_matched, jnp.asarray(matched_gt)]).astype(jnp.int32)
    state = jnp.concatenate([jnp.where(gt_valid, 1, -1), jnp.asarray(state)]).astype(jnp.int32)
    return matched, state
