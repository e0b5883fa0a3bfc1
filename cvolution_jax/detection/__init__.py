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
- ``rpn``, ``roi_head``, ``mask_head``: the heads with their targets, losses and test-time outputs.
- ``faster_rcnn``: the detector (``FasterRCNN``) and its ``Settings``.
- ``evaluation``: COCO results and pycocotools' ``COCOeval``; ``visualize``: pictures.

Data comes from ``cvolution_jax.data``: ``coco`` (COCO-format annotations), ``coco_transforms`` (size
buckets, padded ground truth) and ``shapes`` (the synthetic default); training and evaluation
runs are the task ``cvolution_jax.tasks.detection`` (``experiments/coco.py``).

A detector is any flax module with the ``Detector`` contract; the task builds one by name
(``cvolution_jax.tasks.detection.DETECTORS``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Detector(Protocol):
    """What the detection task, ``cvolution_jax.kernel_maps`` and inference need of a detector.

    A batch is ``{"image" [B, H, W, 3] float (normalised, padded), "image_size" [B, 2] (the
    resized image's h, w inside the padding)}`` and, to train, the padded ground truth
    ``"boxes" [B, G, 4]``, ``"labels" [B, G]``, ``"gt_valid" [B, G]`` (and ``"masks" [B, G, M, M]``
    with a mask branch), as ``cvolution_jax.data.coco`` makes it.
    """

    backbone: object  # a cvolution_jax.models.Backbone
    with_mask: bool  # detections and training add instance masks
    loss_names: tuple[str, ...]  # the entries of `losses` summed into the training objective

    def features(self, images, train: bool = False):
        """The neck's levels, each ``[B, H / s, W / s, C]``: what the heads see."""

    def dense_head_outputs(self, images):
        """The dense head's outputs (mmdet's ``dense_heads``: RPN, RetinaHead) on ``features``, at
        inference: every layer whose spatial op sees only the image."""

    @staticmethod
    def num_classes_in(variables: dict) -> int:
        """The object classes (background excluded) a trained detector's ``variables`` predict."""

    def __call__(self, batch):
        """Static-shape detections ``{"boxes" [B, D, 4], "scores" [B, D], "labels" [B, D],
        "valid" [B, D]}`` in the resized image's pixels (plus ``"masks" [B, D, m, m]`` over each
        box with a mask branch)."""

    def losses(self, batch, key):
        """A dict of scalars: every name of ``loss_names``, plus any metric worth logging."""
