"""The R-CNN box head: mmdet v2's ``Shared2FCBBoxHead`` with its targets, losses and detections.

RoIAlign 7x7 features of each RoI -> two fully connected layers of 1024 with ReLU -> class
logits (``num_classes + 1``, background last as in mmdet v2) and class-specific deltas
(``num_classes * 4``, normalised by stds ``(0.1, 0.1, 0.2, 0.2)``).

Training (mmdet's R-CNN ``train_cfg``): ``MaxIoUAssigner(0.5, 0.5, min_pos_iou=0.5,
match_low_quality=False)`` on the proposals, the ground-truth boxes joined as positives
matched to themselves, then ``RandomSampler(512, 0.25)``; softmax cross-entropy over the sampled RoIs and L1 on the
positives' deltas of their class, both averaged over the sampled RoIs of the batch.

Test: softmax scores, per-class decoded boxes clipped to the image, candidates with score >
``score_threshold``, class-aware NMS, the best ``max_detections`` kept.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cvolution_jax.detection import assign, coder, nms


class BoxHead(nn.Module):
    """``[B, R, S, S, C]`` RoI features -> ``(logits [B, R, num_classes + 1], deltas [B, R, num_classes, 4])``."""

    num_classes: int
    fc_dim: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features):
        batch, rois = features.shape[:2]
        x = features.reshape(batch, rois, -1)
        for i in range(2):  # mmdet initialises the shared FCs with Xavier (uniform)
            x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                                 name=f"shared_fc{i}")(x))
        logits = nn.Dense(self.num_classes + 1, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                          name="fc_cls")(x)
        deltas = nn.Dense(self.num_classes * 4, dtype=self.dtype, kernel_init=nn.initializers.normal(0.001),
                          name="fc_reg")(x)
        return (logits.astype(jnp.float32),
                deltas.reshape(batch, rois, self.num_classes, 4).astype(jnp.float32))


def targets(key, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, *, num_classes, num_samples=512,
            pos_fraction=0.25, iou_threshold=0.5):
    """Sampled RoIs of one image and their targets.

    Args:
      proposals: ``[P, 4]`` (no gradient); proposal_valid: ``[P]`` bool.
      gt_boxes: ``[G, 4]``; gt_labels: ``[G]`` in ``[0, num_classes)``; gt_valid: ``[G]`` bool.

    Returns:
      dict of ``rois [S, 4]``, ``labels [S]`` (``num_classes`` = background), ``deltas [S, 4]``
      (zeros except for positives), ``gt_index [S]`` (each RoI's matched ground truth, valid for
      positives), ``is_pos [S]`` and ``sampled [S]`` (slot in use), S = ``num_samples``. Positives
      fill the first slots (``assign.sample``).
    """
    # mmdet assigns the proposals alone, then prepends the ground truth as proposals matched to
    # themselves (``add_gt_as_proposals``).
    matched, state = assign.assign(proposals, gt_boxes, gt_valid, pos_iou_thr=iou_threshold, neg_iou_thr=iou_threshold,
                                   min_pos_iou=iou_threshold, match_low_quality=False, box_valid=proposal_valid)
    boxes, _ = assign.with_gt_proposals(proposals, proposal_valid, gt_boxes, gt_valid)
    matched, state = assign.with_gt_assignment(matched, state, gt_valid)
    indices, is_pos, sampled = assign.sample(key, state, num_samples, pos_fraction)
    rois = boxes[indices]
    gt_index = matched[indices]
    goals = jnp.where(is_pos[:, None], gt_boxes[gt_index], rois)  # see rpn.targets: no log(0)
    return {
        "rois": jnp.where(sampled[:, None], rois, 0.0),
        "labels": jnp.where(is_pos, gt_labels[gt_index], num_classes),
        "deltas": coder.encode(rois, goals),
        "gt_index": gt_index,
        "is_pos": is_pos,
        "sampled": sampled,
    }


def loss(logits, deltas, target):
    """``(classification, regression, accuracy)`` over a batch of sampled RoIs.

    logits ``[B, S, C + 1]``, deltas ``[B, S, C, 4]``; ``target`` holds ``targets``' outputs
    stacked over the batch.
    """
    sampled = target["sampled"].astype(jnp.float32)
    count = jnp.maximum(sampled.sum(), 1)
    labels = target["labels"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    num_classes = deltas.shape[2]
    own = jnp.take_along_axis(deltas, jnp.minimum(labels, num_classes - 1)[..., None, None], axis=2)[:, :, 0]
    l1 = jnp.abs(own - target["deltas"]).sum(-1)
    correct = (logits.argmax(-1) == labels) * sampled
    return (ce * sampled).sum() / count, (l1 * target["is_pos"]).sum() / count, correct.sum() / count


def detections(logits, deltas, rois, roi_valid, image_size, *, score_threshold=0.05, iou_threshold=0.5,
               max_detections=100, nms_pre=1000):
    """Final detections of one image.

    Args:
      logits: ``[R, C + 1]``; deltas: ``[R, C, 4]``; rois: ``[R, 4]``; roi_valid: ``[R]`` bool.
      image_size: ``[2]`` unpadded ``(h, w)``.
      nms_pre: static cap on the (RoI, class) candidates entering NMS, the best by score (mmdet
        sends every candidate above ``score_threshold``; a static size needs a cap, and 1000
        candidates for 100 outputs loses nothing in practice).

    Returns:
      dict of ``boxes [D, 4]``, ``scores [D]``, ``labels [D]`` (contiguous class ids) and
      ``valid [D]``, D = ``max_detections``, by descending score.
    """
    num_rois, num_classes = deltas.shape[:2]
    scores = jax.nn.softmax(logits, axis=-1)[:, :num_classes]
    boxes = coder.decode(rois[:, None, :], deltas, max_shape=image_size)  # [R, C, 4]
    candidate = (scores > score_threshold) & roi_valid[:, None]
    flat_scores = jnp.where(candidate, scores, -jnp.inf).reshape(-1)
    k = min(nms_pre, flat_scores.shape[0])
    top_scores, top = jax.lax.top_k(flat_scores, k)
    top_boxes = boxes.reshape(-1, 4)[top]
    top_labels = (top % num_classes).astype(jnp.int32)
    keep, kept = nms.batched_nms(top_boxes, top_scores, top_labels, iou_threshold, max_detections)
    return {
        "boxes": jnp.where(kept[:, None], top_boxes[keep], 0.0),
        "scores": jnp.where(kept, top_scores[keep], 0.0),
        "labels": jnp.where(kept, top_labels[keep], 0),
        "valid": kept,
    }
