"""mmseg's `EncoderDecoder`: backbone, optional neck, decode head and optional auxiliary head.

    model = EncoderDecoder(backbone, FPNHead(19), neck=FPN(256, "conv", num_outs=4))
    logits = model.apply(variables, images)                              # [B, h/4, w/4, N]
    losses, updates = model.apply(variables, images, labels, method="losses",
                                  mutable=["batch_stats"], rngs={"dropout": key})

The backbone is any registry network (`cvolution_jax.models.create`) returning C2-C5; its
BatchNorm trains with batch statistics (mmseg's `norm_eval=False`). Under `jax.jit` with the
batch sharded over the mesh, those statistics are over the global batch: mmseg's SyncBN.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvolution_jax.data.semantic_records import IGNORE_INDEX
from cvolution_jax.segmentation.heads import resize_bilinear


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
    """mmseg's `CrossEntropyLoss` (v0.x, `avg_non_ignore=False`): per-pixel softmax cross-entropy,
    0 at pixels labelled `ignore_index`, averaged over ALL pixels (ignored ones included).

    logits: float `[B, H, W, N]`; labels: int `[B, H, W]`.
    """
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0).mean()


class EncoderDecoder(nn.Module):
    """Backbone -> (neck) -> decode head, plus an auxiliary head on the backbone's stages in training.

    Attributes:
      backbone: a `cvolution_jax.models.ResNet`, called with `return_stages=True` (its `fc` is
        never created).
      decode_head: `FPNHead` (reads the neck's levels) or `UPerHead` (reads C2-C5).
      neck: `cvolution_jax.necks.fpn.FPN` with `num_outs=4`, or None.
      auxiliary_head: e.g. `FCNHead` on C4 (reads the backbone's stages), or None.
      aux_weight: the auxiliary loss's weight (0.4 in mmseg's UPerNet).
      ignore_index: the label of pixels that count in neither loss nor metrics.
    """

    backbone: nn.Module
    decode_head: nn.Module
    neck: nn.Module | None = None
    auxiliary_head: nn.Module | None = None
    aux_weight: float = 0.4
    ignore_index: int = IGNORE_INDEX

    def _stages(self, images, train: bool):
        return self.backbone(images, train=train, return_stages=True)

    def _decode(self, stages, train: bool):
        features = self.neck(stages, train) if self.neck is not None else stages
        return self.decode_head(features, train)

    def __call__(self, images, train: bool = False):
        """`images [B, H, W, 3]` -> the decode head's logits `[B, h, w, num_classes]` float32."""
        return self._decode(self._stages(images, train), train)

    def predict(self, images, size: tuple[int, int]):
        """mmseg's whole-image inference: logits upsampled (bilinear) to the input, then to `size`
        (the original image's, when the input was rescaled), arg-maxed: int32 `[B, *size]`."""
        logits = resize_bilinear(self(images, train=False), images.shape[1:3])
        return resize_bilinear(logits, size).argmax(-1).astype(jnp.int32)

    def losses(self, images, labels):
        """`{"decode", "aux" (with an auxiliary head), "loss"}`: each head's logits upsampled
        (bilinear) to the labels' size `[B, H, W]`, mmseg's cross-entropy; `loss` is their
        weighted sum."""
        stages = self._stages(images, train=True)
        size = labels.shape[1:3]
        decode = cross_entropy(resize_bilinear(self._decode(stages, True), size), labels, self.ignore_index)
        losses = {"decode": decode, "loss": decode}
        if self.auxiliary_head is not None:
            aux = cross_entropy(resize_bilinear(self.auxiliary_head(stages, True), size), labels, self.ignore_index)
            losses.update(aux=aux, loss=decode + self.aux_weight * aux)
        return losses


def init_variables(model: EncoderDecoder, key, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """`params` and `batch_stats` of `model` for `[1, *image_shape]` images, the auxiliary head's
    included (it runs only in training, so `model.init` alone would leave it out)."""
    height, width = image_shape[:2]
    images = jnp.zeros((1, *image_shape), jnp.float32)
    labels = jnp.zeros((1, height, width), jnp.int32)
    params_key, dropout_key = jax.random.split(key)
    return model.init({"params": params_key, "dropout": dropout_key}, images, labels, method=EncoderDecoder.losses)
