"""Faster R-CNN with FPN: backbone, neck, RPN head, RoI head, in mmdetection's composition.

Mask R-CNN is this detector with the RoI head's mask branch on (``mask_op``; ``MaskRCNN``).

    detector = FasterRCNN(backbone=models.create("cednet50"), num_classes=80, neck_op=SpatialOp("cvolution"))
    variables = detector.init(key, batch)                        # batch: see cvolution_jax.data.coco_transforms
    dets = detector.apply(variables, batch)                      # boxes/scores/labels/valid [B, 100, ...]
    losses, updates = detector.apply(variables, batch, key, method=FasterRCNN.losses,
                                     mutable=["batch_stats"])

The backbone is any classification model of the registry, by default run in inference mode
(BatchNorm frozen, as mmdet's ``norm_eval=True``); freezing its stem and first stage (``frozen_stages=1``)
is the optimizer's job (``frozen``). Every shape is static: anchors come from the padded image
size, ground truth is padded with a validity mask, proposal and RoI counts are fixed.

A batch is a dict of ``image [B, H, W, 3]`` (normalised, zero-padded), ``image_size [B, 2]``
(unpadded ``(h, w)``), and for training ``boxes [B, G, 4]``, ``labels [B, G]``, ``gt_valid
[B, G]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvolution_jax.detection import anchors as anchors_lib
from cvolution_jax.detection import mask_head, roi_align, roi_head, rpn
from cvolution_jax.necks.fpn import FPN
from cvolution_jax.layers import SpatialOp


LOSSES = ("rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg")  # summed into the training loss (plus rcnn_mask)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The detector's training and test settings; the defaults are mmdet v2's Faster R-CNN 1x."""

    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    anchor_scale: float = 8.0
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # RPN training: sampling and the proposals handed to the R-CNN.
    rpn_samples: int = 256
    rpn_pos_fraction: float = 0.5
    rpn_nms_iou: float = 0.7
    train_nms_pre: int = 2000  # per level
    train_proposals: int = 1000
    # R-CNN training.
    rcnn_samples: int = 512
    rcnn_pos_fraction: float = 0.25
    rcnn_iou: float = 0.5
    roi_size: int = 7
    # Test.
    test_nms_pre: int = 1000  # per level
    test_proposals: int = 1000
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100
    detections_nms_pre: int = 1000  # (RoI, class) candidates entering the final NMS
    # Mask R-CNN only: RoIAlign size of the mask head (its masks are twice that), the probability
    # at which a pasted mask is binarised (mmdet's mask_thr_binary), and a cap on the positive RoIs
    # per image the mask head trains on (0: all of them, as mmdet; a random subset otherwise).
    mask_roi_size: int = 14
    mask_threshold: float = 0.5
    mask_rois: int = 0


class FasterRCNN(nn.Module):
    """The two-stage detector with FPN: Faster R-CNN, or Mask R-CNN with the mask branch on.

    As in mmdet's ``StandardRoIHead``, the RoI stage has a box branch and an optional mask branch
    (``mask_op``, see ``MaskRCNN``): with it, detections gain ``masks`` and the training losses
    ``rcnn_mask``.

    Attributes:
      backbone: a `cvolution_jax.models.ResNet` (its `fc` is never created).
      num_classes: object classes (80 for COCO), background excluded.
      neck_op: the FPN output op, a `cvolution_jax.layers.SpatialOp`: conv (3x3), involution or
        C-volution (K=7).
      rpn_op: the RPN's shared layer: conv (3x3), or involution / C-volution (head variants).
      channels: FPN and RPN channels (256).
      fc_dim: width of the box head's two FC layers (1024).
      settings: `Settings`.
      norm_eval: run the backbone's BatchNorm in inference mode (mmdet's ``norm_eval``; True when
        the backbone comes pretrained, False to train one from scratch with batch statistics).
      mask_op: the mask branch's layers: None (no mask branch: Faster R-CNN), conv (3x3), or
        involution / C-volution (K=7, the C-volution paper's "head" variants).
      mask_convs: number of those layers (mmdet's ``num_convs``, 4).
      mask_channels: their width (mmdet's ``conv_out_channels``, 256; an op keeps the FPN's
        ``channels``, so it must equal them).
    """

    backbone: nn.Module
    num_classes: int
    neck_op: SpatialOp = SpatialOp("conv")
    rpn_op: SpatialOp = SpatialOp("conv")
    channels: int = 256
    fc_dim: int = 1024
    settings: Settings = Settings()
    norm_eval: bool = True
    dtype: Any = jnp.float32
    mask_op: SpatialOp | None = None
    mask_convs: int = 4
    mask_channels: int = 256

    @property
    def with_mask(self) -> bool:
        return self.mask_op is not None

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The losses summed into the training objective."""
        return LOSSES + (("rcnn_mask",) if self.with_mask else ())

    def setup(self):
        self.neck = FPN(self.channels, self.neck_op, dtype=self.dtype)
        self.rpn_head = rpn.RPNHead(len(self.settings.anchor_ratios), self.channels, self.rpn_op, dtype=self.dtype)
        self.box_head = roi_head.BoxHead(self.num_classes, self.fc_dim, dtype=self.dtype)
        if self.with_mask:
            self.mask_head = mask_head.MaskHead(self.num_classes, self.mask_channels, self.mask_op, self.mask_convs,
                                                dtype=self.dtype)

    def features(self, images, train: bool = False):
        """The FPN levels of `images [B, H, W, 3]`: P2-P6, each `[B, H / s, W / s, channels]` for
        strides `settings.strides`. What the heads see; `cvolution_jax.kernel_maps` draws their ops."""
        stages = self.backbone(images, train=train and not self.norm_eval, return_stages=True)
        return self.neck(stages, train)

    def dense_head_outputs(self, images):
        """The RPN head's ``(logits, deltas)`` per level on the FPN levels of ``images [B, H, W, 3]``,
        at inference: every layer with a spatial op that sees only the image (the mask head's need
        boxes, which come later). What ``cvolution_jax.kernel_maps`` runs."""
        return self.rpn_head(self.features(images), train=False)

    @staticmethod
    def num_classes_in(variables: dict) -> int:
        """The object classes of a trained detector's ``variables``: its box classifier's outputs but background."""
        return int(variables["params"]["box_head"]["fc_cls"]["bias"].shape[0]) - 1

    def _anchors(self, image_shape, levels):
        per_level = anchors_lib.anchors_for_levels(
            image_shape, self.settings.strides, self.settings.anchor_scale, self.settings.anchor_ratios)
        sizes = [level.shape[1:3] for level in levels]
        return jnp.concatenate(per_level), [a.shape[0] for a in per_level], sizes

    def _proposals(self, logits, deltas, anchors, counts, sizes, image_size, train):
        s = self.settings
        valid = jax.vmap(lambda size: rpn.anchor_valid(len(s.anchor_ratios), s.strides, sizes, size))(image_size)
        propose = lambda lg, dl, v, size: rpn.proposals(  # noqa: E731
            lg, dl, anchors, v, counts, size, nms_pre=s.train_nms_pre if train else s.test_nms_pre,
            max_proposals=s.train_proposals if train else s.test_proposals, iou_threshold=s.rpn_nms_iou)
        boxes, kept = jax.vmap(propose)(logits, deltas, valid, image_size)
        return valid, boxes, kept

    def _box_head(self, levels, rois):
        s = self.settings
        features = roi_align.multilevel_roi_align(levels[:4], rois, (s.roi_size, s.roi_size), s.strides[:4])
        return self.box_head(features)

    def _mask_head(self, levels, rois, train):
        s = self.settings
        features = roi_align.multilevel_roi_align(levels[:4], rois, (s.mask_roi_size, s.mask_roi_size),
                                                  s.strides[:4])
        return self.mask_head(features, train)

    def __call__(self, batch):
        """Detections ``{"boxes" [B, D, 4], "scores" [B, D], "labels" [B, D], "valid" [B, D]}``
        in the resized image's pixels (D = ``settings.max_detections``); with the mask branch also
        ``"masks" [B, D, 2S, 2S]``, each detection's mask probabilities over its box
        (S = ``settings.mask_roi_size``)."""
        s = self.settings
        levels = self.features(batch["image"], train=False)
        logits, deltas = self.rpn_head(levels, train=False)
        anchors, counts, sizes = self._anchors(batch["image"].shape[1:3], levels)
        _, rois, roi_valid = self._proposals(logits, deltas, anchors, counts, sizes, batch["image_size"], train=False)
        cls_logits, box_deltas = self._box_head(levels, rois)
        detect = lambda lg, dl, r, v, size: roi_head.detections(  # noqa: E731
            lg, dl, r, v, size, score_threshold=s.score_threshold, iou_threshold=s.nms_iou,
            max_detections=s.max_detections, nms_pre=s.detections_nms_pre)
        dets = jax.vmap(detect)(cls_logits, box_deltas, rois, roi_valid, batch["image_size"])
        if self.with_mask:
            mask_logits = self._mask_head(levels, dets["boxes"], train=False)
            dets["masks"] = jax.nn.sigmoid(mask_head.class_maps(mask_logits, dets["labels"]))
        return dets

    def losses(self, batch, key):
        """The training losses (``loss_names``) and the R-CNN's sampled accuracy, as a dict of scalars."""
        s = self.settings
        rpn_key, rcnn_key = jax.random.split(key)
        batch_size = batch["image"].shape[0]
        levels = self.features(batch["image"], train=True)
        logits, deltas = self.rpn_head(levels, train=True)
        anchors, counts, sizes = self._anchors(batch["image"].shape[1:3], levels)
        valid, rois, roi_valid = self._proposals(logits, deltas, anchors, counts, sizes, batch["image_size"],
                                                 train=True)

        rpn_target = jax.vmap(lambda k, v, g, gv: rpn.targets(
            k, anchors, v, g, gv, num_samples=s.rpn_samples, pos_fraction=s.rpn_pos_fraction))(
            jax.random.split(rpn_key, batch_size), valid, batch["boxes"], batch["gt_valid"])
        rpn_cls, rpn_reg = rpn.loss(logits, deltas, *rpn_target)

        target = jax.vmap(lambda k, p, pv, g, gl, gv: roi_head.targets(
            k, p, pv, g, gl, gv, num_classes=self.num_classes, num_samples=s.rcnn_samples,
            pos_fraction=s.rcnn_pos_fraction, iou_threshold=s.rcnn_iou))(
            jax.random.split(rcnn_key, batch_size), rois, roi_valid, batch["boxes"], batch["labels"],
            batch["gt_valid"])
        cls_logits, box_deltas = self._box_head(levels, target["rois"])
        rcnn_cls, rcnn_reg, accuracy = roi_head.loss(cls_logits, box_deltas, target)
        losses = {"rpn_cls": rpn_cls, "rpn_reg": rpn_reg, "rcnn_cls": rcnn_cls, "rcnn_reg": rcnn_reg,
                  "rcnn_accuracy": accuracy}
        if self.with_mask:
            losses["rcnn_mask"] = self._mask_loss(levels, target, batch)
        return losses

    def _mask_loss(self, levels, target, batch):
        """The mask branch's loss on the positive RoIs of the R-CNN sample.

        The sampler puts the positives in the first ``int(rcnn_samples * rcnn_pos_fraction)``
        slots, a static count, so the mask head always sees that many RoIs (the unused ones are
        masked out of the loss); ``Settings.mask_rois`` can cap the count to save compute. The
        batch needs ``masks [B, G, M, M]``: each ground truth's mask cropped to its box.
        """
        s = self.settings
        num_masks = max(int(s.rcnn_samples * s.rcnn_pos_fraction), 1)
        if s.mask_rois > 0:  # the positives sit in random order, so the first ones are a random subset
            num_masks = min(num_masks, s.mask_rois)
        rois = target["rois"][:, :num_masks]
        positive = target["is_pos"][:, :num_masks]
        gt_index = target["gt_index"][:, :num_masks]
        take = lambda array: jnp.take_along_axis(  # noqa: E731
            array, gt_index.reshape(*gt_index.shape, *(1,) * (array.ndim - 2)), axis=1)
        logits = self._mask_head(levels, rois, train=True)
        size = logits.shape[2]
        targets = jax.vmap(lambda r, b, m: mask_head.mask_targets(r, b, m, size))(
            rois, take(batch["boxes"]), take(batch["masks"]))
        return mask_head.loss(logits, take(batch["labels"]), targets, positive)


def frozen(path: Sequence[str], frozen_stages: int) -> bool:
    """Whether the parameter at ``path`` (e.g. ``("backbone", "layer1_0", "conv1", "kernel")``) is
    frozen: mmdet's ``frozen_stages=k`` freezes the stem and the first k stages of the backbone."""
    if frozen_stages < 0 or len(path) < 2 or path[0] != "backbone":
        return False
    name = path[1]
    if name.startswith("stem_"):
        return True
    if name.startswith("layer"):
        return int(name[len("layer"):].split("_")[0]) <= frozen_stages
    return False
