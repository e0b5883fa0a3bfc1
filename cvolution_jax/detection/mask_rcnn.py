"""Mask R-CNN with FPN: Faster R-CNN with mmdet v2's FCN mask head on 14x14 RoIAlign features.

    detector = MaskRCNN(backbone=models.create("cednet50"), num_classes=80, neck_op=SpatialOp("cvolution"))
    dets = detector.apply(variables, batch)   # FasterRCNN's detections plus "masks" [B, D, 28, 28]

As mmdet builds it, Mask R-CNN is the two-stage detector with the RoI head's mask branch on
(``FasterRCNN.mask_op``): same modules, same parameters, nothing overridden. Training adds the mask
loss (``rcnn_mask``) on the positive RoIs of the R-CNN sample; the batch then also needs
``masks [B, G, M, M]``, each ground truth's mask cropped to its box (``cvolution_jax.data.coco_transforms``
with ``mask_size=M``).

At test time the mask head runs on the final detection boxes and returns each detection's
class's mask probabilities over its box; they are pasted into the original image on the host, so
no image-size mask ever lives on the device.
"""

from __future__ import annotations

from cvolution_jax.detection.faster_rcnn import FasterRCNN
from cvolution_jax.layers import SpatialOp


class MaskRCNN(FasterRCNN):
    """`FasterRCNN` with the mask branch on by default (``mask_op=SpatialOp("conv")``, mmdet's 3x3 convolutions).

    Only the default differs; the fields, the modules and the computation are `FasterRCNN`'s.
    """

    mask_op: SpatialOp | None = SpatialOp("conv")
