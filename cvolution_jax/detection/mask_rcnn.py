"""Mask R-CNN with FPN: Faster R-CNN plus mmdet v2's FCN mask head on 14x14 RoIAlign features.

    detector = MaskRCNN(backbone=models.create("cednet50"), num_classes=80, neck_op="cvolution")
    dets = detector.apply(variables, batch)   # FasterRCNN's detections plus "masks" [B, D, 28, 28]

Training adds the mask loss (``rcnn_mask``) on the positive RoIs of the R-CNN sample: the sampler
puts them in the first ``int(rcnn_samples * rcnn_pos_fraction)`` slots, a static count, so the mask
head always sees that many RoIs (the unused ones are masked out of the loss); ``Settings.mask_rois``
can cap the count to save compute. The batch then also
needs ``masks [B, G, M, M]``: each ground truth's mask cropped to its box
(``cvolution_jax.data.coco`` with ``mask_size=M``).

At test time the mask head runs on the final detection boxes and returns each detection's
class's mask probabilities; ``masks.paste_masks`` pastes them into the original image on the host
(``cvolution_jax.detection.loop``), so no image-size mask ever lives on the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cvolution_jax.detection import mask_head, masks, roi_align
from cvolution_jax.detection.faster_rcnn import LOSSES, FasterRCNN


class MaskRCNN(FasterRCNN):
    """Mask R-CNN with FPN (`FasterRCNN`'s attributes, plus:).

    Attributes:
      mask_op: the mask head's layers: "conv" (3x3), or "involution" / "cvolution" (K=7, the
        seed's "head" variants).
      mask_convs: number of those layers (mmdet's ``num_convs``, 4).
      mask_channels: their width (mmdet's ``conv_out_channels``, 256; an op keeps the FPN's
        ``channels``, so it must equal them).
    """

    mask_op: str = "conv"
    mask_convs: int = 4
    mask_channels: int = 256

    loss_names = LOSSES + ("rcnn_mask",)

    def setup(self):
        super().setup()
        self.mask_head = mask_head.MaskHead(self.num_classes, self.mask_channels, self.mask_op, self.mask_convs,
                                            op_kwargs=self.op_kwargs, dtype=self.dtype)

    def _mask_logits(self, levels, rois, train):
        s = self.settings
        features = roi_align.multilevel_roi_align(levels[:4], rois, (s.mask_roi_size, s.mask_roi_size),
                                                  s.strides[:4])
        return self.mask_head(features, train)

    def __call__(self, batch):
        """`FasterRCNN`'s detections plus ``"masks" [B, D, 2S, 2S]``: each detection's mask
        probabilities over its box (S = ``settings.mask_roi_size``)."""
        levels, dets = self.detect(batch)
        logits = self._mask_logits(levels, dets["boxes"], train=False)
        return {**dets, "masks": jax.nn.sigmoid(mask_head.class_maps(logits, dets["labels"]))}

    def losses(self, batch, key):
        """`FasterRCNN.losses` plus ``rcnn_mask``."""
        losses, levels, target = self.detector_losses(batch, key)
        s = self.settings
        num_masks = max(int(s.rcnn_samples * s.rcnn_pos_fraction), 1)
        if s.mask_rois > 0:  # the positives sit in random order, so the first ones are a random subset
            num_masks = min(num_masks, s.mask_rois)
        rois = target["rois"][:, :num_masks]
        positive = target["is_pos"][:, :num_masks]
        gt_index = target["gt_index"][:, :num_masks]
        take = lambda array: jnp.take_along_axis(  # noqa: E731
            array, gt_index.reshape(*gt_index.shape, *(1,) * (array.ndim - 2)), axis=1)
        logits = self._mask_logits(levels, rois, train=True)
        size = logits.shape[2]
        targets = jax.vmap(lambda r, b, m: masks.mask_targets(r, b, m, size))(
            rois, take(batch["boxes"]), take(batch["masks"]))
        losses["rcnn_mask"] = mask_head.loss(logits, take(batch["labels"]), targets, positive)
        return losses
