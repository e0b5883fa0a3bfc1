"""mmseg's segmentation metrics from one confusion matrix over the whole eval set.

    confusion = confusion_matrix(pred, label, num_classes)       # on device, per batch; summed
    metrics = iou_metrics(confusion)                             # {"mIoU", "mAcc", "aAcc", "IoU", "Acc"}
    print(format_table(metrics, class_names))

`confusion[t, p]` counts pixels of true class `t` predicted as `p`; pixels labelled
`ignore_index` (255) are left out. Per class, as mmseg's `total_area_to_label`:
intersect = diagonal, pred area = column sum, label area = row sum,
IoU = intersect / (pred area + label area - intersect), Acc = intersect / label area;
aAcc = sum(intersect) / sum(label area). mIoU and mAcc are nan-means: a class absent from both
prediction and labels has IoU 0/0 (NaN) and is left out of mIoU, as mmseg's `np.nanmean`
does; a class predicted but never labelled has IoU 0 (it counts) and Acc NaN (it does not).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cvolution_jax.segmentation.encoder_decoder import IGNORE_INDEX


def confusion_matrix(pred, label, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """int32 `[N, N]` counts of (label, prediction) over the pixels not labelled `ignore_index`.

    pred, label: int `[...]` of one shape; predictions outside `[0, N)` are a bug and would be
    mis-binned, labels outside it other than `ignore_index` are left out like it.
    """
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    index = jnp.where(valid, label * num_classes + pred, 0).reshape(-1)
    counts = jnp.bincount(index, weights=valid.reshape(-1).astype(jnp.int32), length=num_classes * num_classes)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def iou_metrics(confusion) -> dict:
    """`{"mIoU", "mAcc", "aAcc"}` (floats in [0, 1]) and per-class `"IoU"`, `"Acc"` (float64 `[N]`,
    NaN where undefined) of a confusion matrix `[N, N]` (rows: labels, columns: predictions)."""
    confusion = np.asarray(confusion, np.float64)
    intersect = np.diag(confusion)
    label_area = confusion.sum(axis=1)
    union = confusion.sum(axis=0) + label_area - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / label_area
    total = label_area.sum()
    mean = lambda values: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")  # noqa: E731
    return {"mIoU": mean(iou), "mAcc": mean(acc), "aAcc": float(intersect.sum() / total) if total else float("nan"),
            "IoU": iou, "Acc": acc}


def format_table(metrics: dict, class_names) -> str:
    """mmseg's per-class table (IoU and Acc in %, `nan` where undefined) and the summary line."""
    width = max(len("class"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}    IoU    Acc"]
    lines += [f"{name:<{width}} {100 * iou:6.2f} {100 * acc:6.2f}"
              for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"])]
    lines.append(f"aAcc {100 * metrics['aAcc']:.2f}  mIoU {100 * metrics['mIoU']:.2f}  mAcc {100 * metrics['mAcc']:.2f}")
    return "\n".join(lines)
