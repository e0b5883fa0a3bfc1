"""Faster R-CNN with FPN in jnp with static shapes, in mmdetection's composition.

Boxes are ``[..., 4]`` arrays in absolute pixel ``(x1, y1, x2, y2)`` with no legacy "+1": a box's
width is ``x2 - x1``, as in mmdetection v2 and pycocotools.

Modules, from geometry to evaluation:
- ``boxes``: ``box_iou`` (the project's one box-IoU function), ``clip_boxes``, ``box_area``.
- ``coder``: ``encode`` / ``decode``, mmdet's ``DeltaXYWHBBoxCoder``.
- ``anchors``: ``anchors_for_levels``, mmdet v2's ``AnchorGenerator`` for FPN levels.
- ``assign``: ``MaxIoUAssigner``, ``RandomSampler`` and ground truth as proposals.
- ``nms``: ``batched_nms``, class-aware greedy NMS with a static output size.
- ``roi_align``: mmcv's aligned RoIAlign (adaptive sampling) and its FPN level mapping.
- the FPN neck is shared with segmentation: ``cvolution_jax.necks.fpn``.
- ``rpn``, ``roi_head``: the heads with their targets, losses and test-time outputs.
- ``faster_rcnn``: the detector (``FasterRCNN``) and its ``Settings``.
- ``evaluation``: COCO results and pycocotools' ``COCOeval``; ``visualize``: pictures.

Data comes from ``cvolution_jax.data``: ``coco`` (COCO-format annotations), ``coco_transforms`` (size
buckets, padded ground truth) and ``shapes`` (the synthetic default); training and evaluation
runs are the task ``cvolution_jax.tasks.detection`` (``experiments/coco.py``).
"""
