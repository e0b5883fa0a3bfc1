"""Pictures of detections for eyeballing a detector: ground truth next to predictions, as a PNG.

``cvolution_jax.data.transforms.denormalize_image`` turns one image of a model batch back into
uint8 pixels; ``draw_detections`` draws ground truth
(left panel) and predictions with class name and score (right panel), one colour per class, with
PIL only, so it runs on a headless host next to evaluation.

Boxes are ``(x1, y1, x2, y2)`` pixels with no "+1", like the rest of ``detection``.
"""

from __future__ import annotations

import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cvolution_jax.files import atomic_open


def class_colour(label):
    """A distinct, stable RGB colour for class index ``label`` (golden-ratio hue steps)."""
    hue = (int(label) * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def _check_boxes(name, boxes, labels, count_name):
    boxes = np.asarray(boxes, np.float64)
    if boxes.size == 0:  # [], [0], [0, 4]: no boxes
        boxes = boxes.reshape(0, 4)
    labels = np.asarray(labels).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name} must have shape [N, 4] (x1, y1, x2, y2) with one entry of {count_name} per "
            f"box; got {boxes.shape} and {labels.shape[0]} labels.")
    return boxes, labels.astype(np.int64)


def _overlay(image, masks, labels, alpha=0.5):
    """``image`` with each bool ``[H, W]`` mask filled in its class colour at ``alpha``."""
    out = image.astype(np.float32)
    for mask, label in zip(masks, labels):
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(class_colour(label), np.float32)
    return out.round().astype(np.uint8)


def _check_masks(name, masks, count, image):
    masks = np.asarray(masks, bool)
    if masks.shape != (count, *image.shape[:2]):
        raise ValueError(
            f"{name} must be bool [N, H, W] = [{count}, {image.shape[0]}, {image.shape[1]}], one mask per box "
            f"in the image's pixels; got {masks.shape}.")
    return masks


def _draw_panel(image, boxes, labels, texts, masks=None):
    if masks is not None:
        image = _overlay(image, masks, labels)
    panel = Image.fromarray(image, "RGB")
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    width = max(1, round(min(image.shape[:2]) / 200))  # readable lines on large images
    for box, label, text in zip(boxes, labels, texts):
        colour = class_colour(label)
        x1, y1, x2, y2 = (float(v) for v in box)
        # PIL rejects x2 < x1; a degenerate prediction still gets drawn as a line or point.
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour,
                       width=width)
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        # Label above the box, or inside it when the box touches the top edge.
        shift = bottom - top + 2 if y1 - (bottom - top + 2) >= 0 else 0
        draw.rectangle([left, top - shift, right + 2, bottom - shift], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 128 else (255, 255, 255)  # legible on dark hues too
        draw.text((x1 + 1, y1 - shift), text, fill=ink, font=font)
    return panel


def draw_detections(image, gt_boxes, gt_labels, boxes, labels, scores, class_names, path,
                    score_threshold=0.3, gt_masks=None, masks=None):
    """Writes a PNG: ground truth (left) next to predictions (right) on ``image``; returns ``path``.

    Args:
      image: uint8 ``[H, W, 3]`` RGB pixels (original image; ``denormalize_image`` makes one
        from a model input, then boxes must be in that resized frame).
      gt_boxes: ``[G, 4]`` ``(x1, y1, x2, y2)`` in the pixels of ``image``.
      gt_labels: ``[G]`` contiguous class indices; negative labels (padding) are skipped.
      boxes: ``[D, 4]`` predicted boxes, same frame.
      labels: ``[D]`` predicted class indices; negative labels are skipped.
      scores: ``[D]`` predicted scores; predictions below ``score_threshold`` are not drawn.
      class_names: sequence, class index -> name.
      path: where to write the PNG (atomically: a temp file, then ``os.replace``).
      gt_masks, masks: optional bool ``[G, H, W]`` / ``[D, H, W]`` instance masks in the pixels of
        ``image``, filled in their box's colour (Mask R-CNN).

    The output is ``[H, 2W, 3]``. Colours are per class (``class_colour``), the same in both
    panels, so a wrong-class prediction shows as a different colour from its ground truth.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 [H, W, 3] RGB; got dtype {image.dtype} and shape {image.shape}. "
            "Use denormalize_image for a normalised model input.")
    gt_boxes, gt_labels = _check_boxes("gt_boxes", gt_boxes, gt_labels, "gt_labels")
    boxes, labels = _check_boxes("boxes", boxes, labels, "labels")
    scores = np.asarray(scores, np.float64).reshape(-1)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"scores must have one entry per predicted box: {boxes.shape[0]} boxes, "
            f"{scores.shape[0]} scores.")
    class_names = list(class_names)
    for name, values in (("gt_labels", gt_labels), ("labels", labels)):
        if values.size and values.max() >= len(class_names):
            raise ValueError(
                f"{name} has class index {values.max()} but class_names holds {len(class_names)} "
                "names; labels must be contiguous indices into class_names.")

    if gt_masks is not None:
        gt_masks = _check_masks("gt_masks", gt_masks, len(gt_boxes), image)
    if masks is not None:
        masks = _check_masks("masks", masks, len(boxes), image)

    gt_keep = gt_labels >= 0
    truth = _draw_panel(image, gt_boxes[gt_keep], gt_labels[gt_keep],
                        [class_names[label] for label in gt_labels[gt_keep]],
                        None if gt_masks is None else gt_masks[gt_keep])
    keep = (labels >= 0) & (scores >= score_threshold)
    order = np.argsort(scores[keep], kind="stable")  # the best drawn last, on top
    predicted = _draw_panel(image, boxes[keep][order], labels[keep][order],
                            [f"{class_names[label]} {score:.2f}"
                             for label, score in zip(labels[keep][order], scores[keep][order])],
                            None if masks is None else masks[keep][order])

    height, width = image.shape[:2]
    canvas = Image.new("RGB", (2 * width, height))
    canvas.paste(truth, (0, 0))
    canvas.paste(predicted, (width, 0))

    with atomic_open(path, "wb") as f:
        canvas.save(f, format="PNG")  # the temp name has no .png to infer the format from
    return os.fspath(path)
