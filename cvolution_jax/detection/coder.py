"""The delta box coder: mmdet v2's ``DeltaXYWHBBoxCoder`` (``bbox2delta`` / ``delta2bbox``).

A box ``(x1, y1, x2, y2)`` is read as centre ``(x1 + x2) / 2`` and size ``x2 - x1`` (no "+1").
Deltas relative to a proposal ``p`` for a target ``g`` are::

    dx = (gx - px) / pw,  dy = (gy - py) / ph,  dw = log(gw / pw),  dh = log(gh / ph)

then normalised as ``(delta - means) / stds``. The defaults ``stds=(0.1, 0.1, 0.2, 0.2)`` are the
R-CNN box head's; mmdet's RPN uses ``means=(0, 0, 0, 0), stds=(1, 1, 1, 1)`` and must pass them.
"""

import math

import jax.numpy as jnp

from cvolution_jax.detection.boxes import check_boxes, clip_boxes

# mmdet's wh_ratio_clip: log-size deltas are clamped to +-log(1000 / 16) ~ 4.135, so exp() cannot
# overflow and one step cannot grow a box more than 62.5x.
WH_RATIO_CLIP = 16 / 1000


def _center_size(boxes):
    return ((boxes[..., 0] + boxes[..., 2]) * 0.5, (boxes[..., 1] + boxes[..., 3]) * 0.5,
            boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])


def encode(proposals, gt, means=(0.0, 0.0, 0.0, 0.0), stds=(0.1, 0.1, 0.2, 0.2)):
    """Regression targets that move ``proposals`` onto ``gt``.

    Args:
      proposals: ``[..., 4]`` source boxes (anchors or proposals).
      gt: ``[..., 4]`` target boxes, broadcastable against ``proposals``.
      means, stds: 4 numbers each; the deltas are returned as ``(delta - means) / stds``.

    Returns:
      ``[..., 4]`` deltas ``(dx, dy, dw, dh)``, float32 or wider.

    As in mmdet there is no epsilon: a proposal or target of zero width or height gives
    non-finite deltas. Padded ground truth must be replaced (e.g. by its proposal) with
    ``jnp.where`` before encoding, not masked after: ``0 * inf`` in a loss is NaN.
    """
    proposals = jnp.asarray(proposals)
    gt = jnp.asarray(gt)
    check_boxes("proposals", proposals)
    check_boxes("gt", gt)
    dtype = jnp.result_type(proposals, gt, jnp.float32)
    px, py, pw, ph = _center_size(proposals.astype(dtype))
    gx, gy, gw, gh = _center_size(gt.astype(dtype))
    deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], -1)
    return (deltas - jnp.asarray(means, dtype)) / jnp.asarray(stds, dtype)


def decode(proposals, deltas, means=(0.0, 0.0, 0.0, 0.0), stds=(0.1, 0.1, 0.2, 0.2),
           max_shape=None, wh_ratio_clip=WH_RATIO_CLIP):
    """Apply ``deltas`` to ``proposals``: the inverse of ``encode``.

    Args:
      proposals: ``[..., 4]`` source boxes.
      deltas: ``[..., 4]`` normalised deltas ``(dx, dy, dw, dh)``, broadcastable against
        ``proposals``.
      means, stds: the normalisation ``encode`` used; deltas are first mapped to
        ``deltas * stds + means``.
      max_shape: ``None``, or the image's ``(height, width)`` (extra trailing entries such as
        channels are ignored, as mmdet does) to clip the boxes to; scalars may be traced.
      wh_ratio_clip: ``dw`` and ``dh`` are clamped to ``[-|log r|, |log r|]``; mmdet's default
        ``16 / 1000`` gives ``+-log(1000 / 16)``.

    Returns:
      ``[..., 4]`` boxes ``(x1, y1, x2, y2)``.
    """
    proposals = jnp.asarray(proposals)
    deltas = jnp.asarray(deltas)
    check_boxes("proposals", proposals)
    check_boxes("deltas", deltas)
    dtype = jnp.result_type(proposals, deltas, jnp.float32)
    deltas = deltas.astype(dtype) * jnp.asarray(stds, dtype) + jnp.asarray(means, dtype)
    px, py, pw, ph = _center_size(proposals.astype(dtype))
    max_ratio = abs(math.log(wh_ratio_clip))
    dw = jnp.clip(deltas[..., 2], -max_ratio, max_ratio)
    dh = jnp.clip(deltas[..., 3], -max_ratio, max_ratio)
    gw = pw * jnp.exp(dw)
    gh = ph * jnp.exp(dh)
    gx = px + pw * deltas[..., 0]
    gy = py + ph * deltas[..., 1]
    boxes = jnp.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], axis=-1)
    if max_shape is not None:
        if len(max_shape) < 2:
            raise ValueError(f"max_shape must be (height, width[, ...]); got {max_shape!r}.")
        boxes = clip_boxes(boxes, max_shape[0], max_shape[1])
    return boxes
