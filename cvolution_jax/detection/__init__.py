"""Detection building blocks for the Faster / Mask R-CNN stack (issue 7), in jnp with static shapes.

Boxes are ``[..., 4]`` arrays in absolute pixel ``(x1, y1, x2, y2)`` with no legacy "+1": a box's
width is ``x2 - x1``, as in mmdetection v2 and pycocotools.

What exists:
- ``boxes``: ``box_iou`` (the project's one box-IoU function) and ``clip_boxes``.
- ``coder``: ``encode`` / ``decode``, mmdet's ``DeltaXYWHBBoxCoder``.
- ``anchors``: ``anchors_for_levels``, mmdet v2's ``AnchorGenerator`` for FPN levels.
- ``nms``: ``batched_nms``, class-aware greedy NMS with a static output size, jit-able.

Planned, not written yet: RoIAlign, the RPN head (with target assignment and sampling), the
box head (and mask head), the FPN neck, detection data (padding to shape buckets, ground truth
padded with a validity mask), COCO evaluation, and the ``experiments/coco.py`` entry point.
"""
