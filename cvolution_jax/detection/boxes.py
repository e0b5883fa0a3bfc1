"""Box geometry: IoU and clipping for ``(x1, y1, x2, y2)`` boxes with no legacy "+1".

``box_iou`` is the project's one box-IoU function: anchor assignment, proposal sampling, NMS and
tests all call it, so that a convention change happens in one place.
"""

import jax.numpy as jnp


def check_boxes(name, boxes):
    """Raises a ValueError unless `boxes` (or deltas) is `[..., 4]`."""
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{name} must have shape [..., 4] holding (x1, y1, x2, y2) or deltas; got shape {boxes.shape}. "
            "Reshape class-specific boxes or deltas [N, C*4] to [N, C, 4] (and proposals [N, 4] to "
            "[N, 1, 4] so they broadcast) first.")


def box_area(boxes):
    """Areas of boxes ``[..., 4]`` -> ``[...]``; inverted boxes (x2 < x1 or y2 < y1) have area 0."""
    boxes = jnp.asarray(boxes)
    check_boxes("boxes", boxes)
    width = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0)
    height = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)
    return width * height


def box_iou(a, b):
    """Pairwise intersection over union.

    Args:
      a: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``.
      b: ``[M, 4]`` boxes.

    Returns:
      ``[N, M]`` IoU in ``[0, 1]``, in the promoted dtype of ``a`` and ``b``. Widths are
      ``x2 - x1`` (no "+1"). A pair whose union is empty (both boxes of zero area) has IoU 0, not
      NaN, and so does its gradient.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    check_boxes("a", a)
    check_boxes("b", b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(
            f"box_iou takes a [N, 4] and b [M, 4]; got shapes {a.shape} and {b.shape}.")
    dtype = jnp.result_type(a, b, jnp.float32)
    a = a.astype(dtype)
    b = b.astype(dtype)
    top_left = jnp.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.maximum(bottom_right - top_left, 0)
    intersection = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - intersection
    nonempty = union > 0
    # Divide by a safe denominator, then select: a bare where(nonempty, i / u, 0) still produces a
    # NaN gradient through the unselected 0/0 branch.
    return jnp.where(nonempty, intersection / jnp.where(nonempty, union, 1), 0)


def clip_boxes(boxes, height, width):
    """Clip boxes ``[..., 4]`` to the image: x into ``[0, width]``, y into ``[0, height]``.

    The upper bound is ``width``, not ``width - 1``: with no "+1" a box covering the whole image
    is ``(0, 0, width, height)``, as mmdet v2 clips in ``delta2bbox``. ``height`` and ``width``
    may be Python numbers or traced scalars (the unpadded size of each image in a padded batch,
    broadcast against ``boxes[..., 0]``).
    """
    boxes = jnp.asarray(boxes)
    check_boxes("boxes", boxes)
    height = jnp.asarray(height, boxes.dtype)
    width = jnp.asarray(width, boxes.dtype)
    x = jnp.clip(boxes[..., 0::2], 0, width[..., None])
    y = jnp.clip(boxes[..., 1::2], 0, height[..., None])
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)
