"""Semantic segmentation: mmseg's `EncoderDecoder` with Semantic FPN and UPerNet heads, the
confusion-matrix metrics (mIoU, mAcc, aAcc) and the Cityscapes palette.

    model = EncoderDecoder(backbone=models.create("rednet50"), decode_head=FPNHead(19),
                           neck=FPN(256, "involution", num_outs=4))
    logits = model.apply(variables, images)                      # [B, H/4, W/4, 19]
    losses, updates = model.apply(variables, images, labels, method="losses",
                                  mutable=["batch_stats"], rngs={"dropout": key})

The task that trains and evaluates these is `cvolution_jax.tasks.segmentation`.
"""
