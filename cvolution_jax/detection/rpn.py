"""The region proposal network: mmdet v2's ``RPNHead``, its training targets and its proposals.

One head shared by every FPN level: a 3x3 convolution (or, in the C-volution paper's "head"
variants, a 7x7 involution / C-volution) with ReLU, then 1x1 convolutions giving, per anchor, one objectness
logit (sigmoid) and four deltas. Anchors of all levels are concatenated in level order, each
level in the order of ``anchors.anchors_for_levels``; the head's outputs are flattened the same
way.

Targets (mmdet's RPN ``train_cfg``): ``MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3,
match_low_quality=True)``, ``RandomSampler(256, 0.5)``, deltas encoded with stds
``(1, 1, 1, 1)``; sigmoid cross-entropy and L1 losses, both averaged over the sampled anchors of
the whole batch.

Proposals: per image and level, the ``nms_pre`` top-scoring anchors; decoded and clipped to the
image; zero-size boxes dropped; NMS at ``iou_threshold`` per level (mmdet v2 passes the level as
the NMS "class"); the best ``max_proposals`` kept, with a validity mask.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cvolution_jax.detection import assign, coder, nms
from cvolution_jax.layers import SpatialOp, conv, spatial_op

RPN_STDS = (1.0, 1.0, 1.0, 1.0)


class RPNHead(nn.Module):
    """``[P2, ..., P6] -> (logits [B, N], deltas [B, N, 4])`` for the N anchors of all levels.

    Attributes:
      num_anchors: anchors per feature cell (number of ratios).
      channels: channels of the shared 3x3 layer (256 in mmdet).
      op: the shared layer, a ``cvolution_jax.layers.SpatialOp`` of kind "conv" (3x3, mmdet)
        or "involution" / "cvolution" (K=7, the paper's head variants).
    """

    num_anchors: int = 3
    channels: int = 256
    op: SpatialOp = SpatialOp()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, levels, train: bool = False):
        init = nn.initializers.normal(0.01)  # mmdet's RPNHead init: N(0, 0.01) for its convs
        shared = spatial_op(self.op, self.channels, name="rpn_conv", dtype=self.dtype, conv_bias=True, conv_init=init)
        cls = conv(self.num_anchors, 1, use_bias=True, kernel_init=init, dtype=self.dtype, name="rpn_cls")
        reg = conv(4 * self.num_anchors, 1, use_bias=True, kernel_init=init, dtype=self.dtype, name="rpn_reg")
        logits, deltas = [], []
        for level in levels:
            y = nn.relu(shared(level, train))
            batch = level.shape[0]
            # [B, H, W, A] -> [B, H*W*A]: row (y*W + x)*A + a, the anchors' order.
            logits.append(cls(y).reshape(batch, -1))
            deltas.append(reg(y).reshape(batch, -1, 4))
        return (jnp.concatenate(logits, 1).astype(jnp.float32),
                jnp.concatenate(deltas, 1).astype(jnp.float32))


def anchor_valid(num_anchors, strides, level_sizes, image_size):
    """Which anchors lie on the image's own feature cells, not on batch padding: ``[N]`` bool.

    mmdet's ``valid_flags``: on a level of stride s, cell (y, x) is valid when
    ``y < ceil(h / s)`` and ``x < ceil(w / s)`` for the unpadded image size ``(h, w)``.
    num_anchors: anchors per cell; level_sizes: ``(H_l, W_l)`` per level (static);
    image_size: ``[2]`` int (may be traced).
    """
    flags = []
    for stride, (height, width) in zip(strides, level_sizes):
        rows = jnp.arange(height)[:, None] < -(-image_size[0] // stride)
        cols = jnp.arange(width)[None, :] < -(-image_size[1] // stride)
        flags.append((rows & cols).reshape(-1))
    return jnp.repeat(jnp.concatenate(flags), num_anchors)


def targets(key, anchors, valid, gt_boxes, gt_valid, *, num_samples=256, pos_fraction=0.5,
            pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3):
    """Sampled anchors and their targets for one image.

    Args:
      anchors: ``[N, 4]``; valid: ``[N]`` bool (``anchor_valid``).
      gt_boxes: ``[G, 4]``; gt_valid: ``[G]`` bool.

    Returns:
      ``(indices [S], is_pos [S], sampled [S], deltas [S, 4])``: S = ``num_samples`` slots of
      anchor indices, whether each is a positive, whether the slot is used at all, and the
      regression targets (zeros except for positives).
    """
    matched, state = assign.assign(anchors, gt_boxes, gt_valid, pos_iou_thr=pos_iou_thr, neg_iou_thr=neg_iou_thr,
                                   min_pos_iou=min_pos_iou, match_low_quality=True, box_valid=valid)
    indices, is_pos, sampled = assign.sample(key, state, num_samples, pos_fraction)
    sources = anchors[indices]
    # Non-positive slots regress onto themselves (zero deltas) so no padded ground truth reaches
    # the encoder's log(0).
    goals = jnp.where(is_pos[:, None], gt_boxes[matched[indices]], sources)
    return indices, is_pos, sampled, coder.encode(sources, goals, stds=RPN_STDS)


def loss(logits, deltas, indices, is_pos, sampled, target_deltas):
    """``(classification, regression)`` losses over a batch; inputs are ``[B, ...]`` stacks of
    ``targets``' outputs and the head's ``[B, N]`` logits / ``[B, N, 4]`` deltas. Both are
    averaged over the batch's sampled anchors, as mmdet does with sampling."""
    picked_logits = jnp.take_along_axis(logits, indices, axis=1)
    picked_deltas = jnp.take_along_axis(deltas, indices[..., None], axis=1)
    count = jnp.maximum(sampled.sum(), 1)
    bce = optax.sigmoid_binary_cross_entropy(picked_logits, is_pos.astype(jnp.float32))
    l1 = jnp.abs(picked_deltas - target_deltas).sum(-1)
    return (bce * sampled).sum() / count, (l1 * is_pos).sum() / count


def proposals(logits, deltas, anchors, valid, level_counts, image_size, *, nms_pre, max_proposals,
              iou_threshold=0.7):
    """Proposals of one image (no gradient flows through them).

    Args:
      logits: ``[N]``; deltas: ``[N, 4]``; anchors: ``[N, 4]``; valid: ``[N]`` bool.
      level_counts: anchors per level (static), summing to N.
      image_size: ``[2]`` unpadded ``(h, w)``; boxes are clipped to it.
      nms_pre: top-scoring anchors kept per level before NMS (static).
      max_proposals: output slots (static).

    Returns:
      ``(boxes [max_proposals, 4], valid [max_proposals])``, by descending score; invalid slots
      hold zero boxes.
    """
    logits = jax.lax.stop_gradient(jnp.where(valid, logits, -jnp.inf))
    deltas = jax.lax.stop_gradient(deltas)
    picked, levels = [], []
    start = 0
    for level, count in enumerate(level_counts):
        k = min(nms_pre, count)
        _, top = jax.lax.top_k(logits[start:start + count], k)
        picked.append(top + start)
        levels.append(jnp.full((k,), level, jnp.int32))
        start += count
    picked = jnp.concatenate(picked)
    scores = logits[picked]
    boxes = coder.decode(anchors[picked], deltas[picked], stds=RPN_STDS, max_shape=image_size)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep, kept = nms.batched_nms(boxes, scores, jnp.concatenate(levels), iou_threshold, max_proposals,
                                 valid=nonempty)  # invalid anchors' -inf scores are never kept
    return jnp.where(kept[:, None], boxes[keep], 0.0), kept
