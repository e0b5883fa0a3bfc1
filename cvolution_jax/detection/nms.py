"""Class-aware greedy non-maximum suppression with a static output size, in jnp.

Semantics are the classic greedy algorithm (torchvision / mmcv ``nms``): visit boxes by score,
highest first, ties broken by lower input index; keep a box unless a kept box of the same class
overlaps it with IoU strictly greater than ``iou_threshold``.

Boxes of different classes are kept apart by testing the classes of each pair in an IoU row,
with the IoU computed in the boxes' own coordinates. mmcv's trick of offsetting each class's boxes
into a region of its own (``class * span``) costs float32 precision: on an 800x600 image class 47
lands near x = 38,000, where float32 resolves 1/256 pixel, and an IoU of 0.7000254 computed there
is 0.6999894, so a box that per-class NMS suppresses at 0.7 is kept.

This is the correct-first version: one ``while_loop`` step per visited box, each computing one
row of IoUs (O(N) memory, O(N^2) work). It stops once ``max_output`` boxes are kept. The tiled
NMS of the design notes (blocks iterated to a fixed point, fewer loop steps on GPU) should be
tested against this one.
"""

import functools

import jax
import jax.numpy as jnp

from cvolution_jax.detection.boxes import box_iou


@functools.partial(jax.jit, static_argnames=("max_output",))
def batched_nms(boxes, scores, classes, iou_threshold, max_output, valid=None):
    """Greedy NMS run separately per class, in one pass.

    Args:
      boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``; any coordinates, inside the image or not.
      scores: ``[N]``. A score of ``-inf`` (or NaN) marks a padding slot, never kept.
      classes: ``[N]`` integer class ids; only boxes of one class suppress each other.
      iou_threshold: a box is suppressed by a kept box when their IoU is ``> iou_threshold``;
        may be traced (it is not baked into the compiled code).
      max_output: static int, the number of output slots.
      valid: optional ``[N]`` bool; ``False`` marks padding slots too.

    Returns:
      ``(indices [max_output] int32, valid [max_output] bool)``: indices into the inputs of the
      kept boxes in visiting order (score descending), then padding slots with index 0 and
      valid ``False``.
    """
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    classes = jnp.asarray(classes)
    n = scores.shape[0] if scores.ndim == 1 else -1
    if (boxes.shape != (n, 4) or classes.shape != (n,)
            or (valid is not None and valid.shape != (n,))):
        raise ValueError(
            "batched_nms takes boxes [N, 4], scores [N], classes [N] (and valid [N]); got "
            f"{boxes.shape}, {scores.shape}, {classes.shape}"
            f"{'' if valid is None else ', ' + str(valid.shape)}.")
    if not jnp.issubdtype(classes.dtype, jnp.integer):
        raise ValueError(f"classes must be integer class ids; got dtype {classes.dtype}.")
    if not isinstance(max_output, int) or max_output <= 0:
        raise ValueError(f"max_output must be a positive Python int; got {max_output!r}.")
    if n == 0:
        return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)

    candidate = scores > -jnp.inf  # False for -inf and NaN
    if valid is not None:
        candidate = candidate & valid
    boxes = boxes.astype(jnp.result_type(boxes, jnp.float32))

    # A stable ascending sort of -score visits tied boxes by lower index first (as the classic
    # loop over a stably sorted list does; jnp's sort also ties -0.0 with 0.0). Padding goes last.
    order = jnp.argsort(jnp.where(candidate, -scores, jnp.inf), stable=True)
    sorted_boxes = boxes[order]
    sorted_classes = classes[order]
    alive = candidate[order]  # not yet suppressed, in visiting order
    position = jnp.arange(n)

    def cond(state):
        i, num_kept, _ = state
        return (i < n) & (num_kept < max_output)

    def body(state):
        i, num_kept, alive = state
        kept = alive[i]
        box = jax.lax.dynamic_slice_in_dim(sorted_boxes, i, 1)
        same_class = sorted_classes == sorted_classes[i]
        overlaps = same_class & (box_iou(box, sorted_boxes)[0] > iou_threshold)
        alive = alive & ~(kept & overlaps & (position > i))
        return i + 1, num_kept + kept.astype(jnp.int32), alive

    i, num_kept, alive = jax.lax.while_loop(cond, body, (0, jnp.int32(0), alive))
    # Boxes past the stopping point were never visited: they were not kept.
    kept = alive & (position < i)
    (slots,) = jnp.nonzero(kept, size=max_output, fill_value=0)
    out_valid = jnp.arange(max_output) < num_kept
    indices = jnp.where(out_valid, order[slots], 0).astype(jnp.int32)
    return indices, out_valid
