"""COCO evaluation: detector outputs -> COCO result dicts -> pycocotools' ``COCOeval`` numbers.

The numbers are the official ones because ``COCOeval`` computes them; this module only gets the
detections into the form it expects and reads its 12 summary numbers out correctly. The traps it
exists to avoid (see the design's "Static-shape detection"):

- labels are contiguous ``[0, num_classes)`` inside the model and must be mapped back to COCO's
  sparse category ids (1..90 with gaps), or every detection silently counts for no category;
- COCO boxes are ``[x, y, w, h]`` in original-image pixels, the model's are ``(x1, y1, x2, y2)``
  in resized-image pixels, with no legacy "+1" in either;
- a static-shape batch holds padding (image slots with id -1, detections with ``valid`` False)
  that must not reach the evaluator;
- ``COCO.loadRes([])`` raises an IndexError, so a model with no detections must be handled;
- ``COCOeval.summarize`` hard-codes ``maxDets``: the first row always asks for 100 (it prints
  -1 when 100 is not among ``maxDets``) and the other rows index ``maxDets[0..2]``. The 12
  numbers here are read from ``COCOeval.eval`` with the indices of the ``max_dets`` asked for;
  with the default ``(1, 10, 100)`` they equal ``COCOeval.stats`` (tests check it);
- masks for ``iou_type="segm"`` are RLE encoded from Fortran-ordered uint8 arrays
  (``masks_to_rle``), and a ``bbox`` next to a segmentation is dropped before evaluation, as
  mmdetection does: otherwise ``loadRes`` takes the box area for the small/medium/large split.

pycocotools is imported only where it is needed (``evaluate``, ``masks_to_rle``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os

import numpy as np

from cvolution_jax.data import masks as masks_lib
from cvolution_jax.files import atomic_open

DEFAULT_MAX_DETS = (1, 10, 100)
# COCOeval.summarize's own line format, so the summary reads like the official one.
_LINE = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"


def _import_pycocotools():
    try:
        from pycocotools import coco, cocoeval, mask
    except ImportError as error:  # not a core dependency of the project
        raise ImportError(
            "COCO evaluation needs pycocotools; install it with `pip install pycocotools`."
        ) from error
    return coco, cocoeval, mask


def segm_ground_truth_problems(annotation_file: str | os.PathLike) -> list[str]:
    """The annotations of a COCO file whose segmentation COCOeval's segm evaluation cannot read,
    one line each naming the annotation and what is wrong; empty if there are none.

    COCOeval turns every ground-truth segmentation of the evaluated images, crowds included,
    into RLE (``COCO.annToRLE``). A missing segmentation raises a KeyError there; polygons that
    pycocotools' ``frPyObjects`` cannot take (none, a first part of fewer than 4 numbers, parts
    that are not numbers) raise; RLE runs covering more pixels than the image make its C code
    write past the mask. Polygons are tried with ``frPyObjects`` itself, so whatever the
    official evaluation reads passes (a first part of 4 numbers is read as a box, short or odd
    later parts are kept); RLE is checked in Python by ``masks.segmentation_error``.
    """
    _, _, mask_utils = _import_pycocotools()
    with open(annotation_file) as f:
        content = json.load(f)
    sizes = {image["id"]: (image["height"], image["width"]) for image in content["images"]}
    problems = []
    for index, annotation in enumerate(content["annotations"]):
        height, width = sizes[annotation["image_id"]]
        segmentation = annotation.get("segmentation")
        if segmentation is None:
            problem = "it has no segmentation"
        elif isinstance(segmentation, dict):
            problem = masks_lib.segmentation_error(segmentation, height, width)
        else:
            try:
                mask_utils.frPyObjects(segmentation, height, width)
                problem = None
            except Exception as error:  # pycocotools raises bare Exceptions, IndexError, ValueError...
                problem = f"pycocotools cannot read it ({type(error).__name__}: {error})"
        if problem is not None:
            problems.append(f"annotations[{index}] (id {annotation.get('id')}): {problem}")
    return problems


def to_coco_results(image_ids, boxes, scores, labels, valid, scale, category_ids, masks=None, image_shapes=None,
                    mask_threshold=0.5):
    """Detections of a padded, static-shape batch -> a list of COCO result dicts.

    Args:
      image_ids: ``[B]`` integer COCO image ids; -1 marks a padding image slot (skipped whole).
      boxes: ``[B, D, 4]`` ``(x1, y1, x2, y2)`` in resized-image pixels.
      scores: ``[B, D]`` detection scores.
      labels: ``[B, D]`` contiguous class indices in ``[0, len(category_ids))``.
      valid: ``[B, D]`` bool (or 0/1 integers): which detection slots are real.
      scale: ``[B, 2]`` ``(new_h / h, new_w / w)`` of each image's resize; boxes are divided by
        it per axis to get original-image pixels.
      category_ids: sequence mapping contiguous label -> COCO category id.
      masks: optional ``[B, D, m, m]`` mask probabilities of each detection over its box (Mask
        R-CNN); each is pasted into its original image (``cvolution_jax.data.masks.paste_masks``, binarised at
        ``mask_threshold``) and RLE encoded as the result's ``"segmentation"``.
      image_shapes: ``[B, 2]`` original ``(height, width)`` of each image; needed with ``masks``.

    Returns:
      A list of ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``
      (plus ``"segmentation"`` with ``masks``) with Python numbers only (JSON-serialisable), in
      batch order, then slot order. Boxes are not clipped: the detector clips to the resized
      image already.
    """
    image_ids = np.asarray(image_ids)
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    valid = np.asarray(valid)
    scale = np.asarray(scale, np.float64)
    category_ids = [int(c) for c in category_ids]

    if image_ids.ndim != 1 or not np.issubdtype(image_ids.dtype, np.integer):
        raise ValueError(
            f"image_ids must be integer COCO ids of shape [B] (-1 for a padding slot); got dtype "
            f"{image_ids.dtype} and shape {image_ids.shape}.")
    batch = image_ids.shape[0]
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        raise ValueError(
            f"boxes must have shape [B, D, 4] = [{batch}, D, 4] (x1, y1, x2, y2) to match "
            f"image_ids [{batch}]; got {boxes.shape}.")
    slots = boxes.shape[:2]
    for name, array in (("scores", scores), ("labels", labels), ("valid", valid)):
        if array.shape != slots:
            raise ValueError(
                f"{name} must have shape [B, D] = {list(slots)} to match boxes {boxes.shape}; got "
                f"{array.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integer class indices; got dtype {labels.dtype}. Pass the argmax / "
            "class index, not scores.")
    if valid.dtype != bool:
        # Integer 0/1 masks are common; float "masks" are more likely scores passed by mistake.
        if not np.issubdtype(valid.dtype, np.integer) or not np.isin(valid, (0, 1)).all():
            raise ValueError(
                f"valid must be a bool (or 0/1 integer) mask of shape [B, D]; got dtype "
                f"{valid.dtype}. Pass the detector's validity mask, e.g. `mask.astype(bool)`.")
        valid = valid.astype(bool)
    if scale.shape != (batch, 2):
        raise ValueError(
            f"scale must have shape [B, 2] = [{batch}, 2] holding (new_h / h, new_w / w) per "
            f"image; got {scale.shape}.")
    if (image_ids < -1).any():
        raise ValueError(
            f"image_ids must be COCO ids >= 0, or -1 for a padding slot; got "
            f"{sorted(set(image_ids[image_ids < -1].tolist()))}.")
    if not category_ids:
        raise ValueError(
            "category_ids is empty; pass the COCO category id of each contiguous label.")

    keep = valid & (image_ids >= 0)[:, None]
    real = image_ids >= 0
    if not (np.isfinite(scale[real]).all() and (scale[real] > 0).all()):
        raise ValueError(
            f"scale must be finite and positive for every real image; got {scale[real].tolist()}. "
            "It is (new_h / h, new_w / w) of the resize that produced the batch.")
    kept_labels = labels[keep]
    if kept_labels.size and (kept_labels.min() < 0 or kept_labels.max() >= len(category_ids)):
        raise ValueError(
            f"valid detections have labels outside [0, {len(category_ids)}) (the range "
            f"category_ids covers): min {kept_labels.min()}, max {kept_labels.max()}. Labels must "
            "be contiguous class indices (no background class); check num_classes and "
            "category_ids.")
    if not (np.isfinite(boxes[keep]).all() and np.isfinite(scores[keep]).all()):
        raise ValueError(
            "valid detections have non-finite boxes or scores (NaN or inf), which JSON and "
            "COCOeval cannot take; mark them invalid or find where the model diverges.")

    # Back to original pixels: x by new_w / w, y by new_h / h.
    per_axis = np.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]], axis=-1)
    original = boxes / np.where(real[:, None], per_axis, 1.0)[:, None, :]
    xywh = np.concatenate([original[..., :2], original[..., 2:] - original[..., :2]], axis=-1)

    results = []
    for b, d in zip(*np.nonzero(keep)):
        results.append({
            "image_id": int(image_ids[b]),
            "category_id": category_ids[int(labels[b, d])],
            "bbox": [float(v) for v in xywh[b, d]],
            "score": float(scores[b, d]),
        })
    if masks is not None:
        _add_segmentations(results, keep, original, masks, image_shapes, mask_threshold)
    return results


def _add_segmentations(results, keep, original_boxes, masks, image_shapes, threshold):
    """Adds each kept detection's pasted, RLE-encoded mask to ``results`` (in ``keep``'s order)."""
    masks = np.asarray(masks, np.float32)
    if masks.ndim != 4 or masks.shape[:2] != keep.shape or masks.shape[2] != masks.shape[3]:
        raise ValueError(
            f"masks must have shape [B, D, m, m] = [{keep.shape[0]}, {keep.shape[1]}, m, m] (one mask per "
            f"detection slot); got {masks.shape}.")
    if image_shapes is None or np.shape(image_shapes) != (keep.shape[0], 2):
        raise ValueError(
            f"image_shapes must be [B, 2] = [{keep.shape[0]}, 2] original (height, width) per image to paste "
            f"masks into; got {None if image_shapes is None else np.shape(image_shapes)}.")
    image_shapes = np.asarray(image_shapes).astype(int)
    index = 0
    for b in range(keep.shape[0]):
        slots = np.flatnonzero(keep[b])
        if not len(slots):
            continue
        height, width = image_shapes[b]
        pasted = masks_lib.paste_masks(masks[b, slots], original_boxes[b, slots], height, width, threshold)
        for rle in masks_to_rle(pasted):
            results[index]["segmentation"] = rle
            index += 1


def masks_to_rle(masks):
    """Binary masks ``[N, H, W]`` (original-image pixels) -> N COCO RLE dicts.

    pycocotools encodes column-major uint8 arrays; a C-ordered or bool array gives wrong RLE or an
    error, so the masks are converted here. ``counts`` is decoded to ``str`` so the dicts are
    JSON-serialisable; put each in a result dict as ``"segmentation"``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(
            f"masks must have shape [N, H, W] (one binary mask per detection, original-image "
            f"size); got {masks.shape}.")
    _, _, mask_utils = _import_pycocotools()
    encoded = mask_utils.encode(np.asfortranarray((masks != 0).transpose(1, 2, 0), dtype=np.uint8))
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            for rle in encoded]


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):  # RLE counts straight from pycocotools
        return value.decode("ascii")
    raise TypeError(f"write_results cannot serialise {type(value).__name__}: {value!r}")


def write_results(path, results):
    """Writes the COCO result dicts as JSON to ``path`` atomically; returns ``path``.

    The JSON goes to a temporary file in the same directory, is flushed to disk, and then
    ``os.replace``-d over ``path``: a crash mid-write leaves the old file (or none), never a
    truncated one that a later evaluation would read. Numpy scalars are written as numbers.
    """
    if not isinstance(results, list):
        raise TypeError(
            f"results must be a list of COCO result dicts (as to_coco_results returns); got "
            f"{type(results).__name__}.")
    with atomic_open(path) as f:
        json.dump(results, f, default=_json_default)
    return path


def _check_max_dets(max_dets):
    try:
        max_dets = tuple(int(m) for m in max_dets)
    except (TypeError, ValueError):
        max_dets = None
    if (max_dets is None or len(max_dets) != 3 or max_dets[0] < 1
            or not max_dets[0] < max_dets[1] < max_dets[2]):
        raise ValueError(
            "max_dets must be three increasing positive integers, the detections per image for "
            "AR at the first two and for AP and AR at the last (COCO's are (1, 10, 100)); got "
            f"{max_dets if max_dets is not None else 'a non-integer sequence'}.")
    return max_dets


def _summary_row(coco_eval, ap, iou_thr, area, max_det):
    """One of ``COCOeval.summarize``'s rows, with ``max_det`` honoured: ``(value, line)``.

    The same arithmetic as pycocotools' ``_summarize``: the mean over the entries that are not
    -1 (-1 marks a category with no ground truth in the area range), -1 when all are.
    """
    params = coco_eval.params
    area_index = params.areaRngLbl.index(area)
    det_index = list(params.maxDets).index(max_det)
    if ap:
        values = coco_eval.eval["precision"]  # [T, R, K, A, M]
    else:
        values = coco_eval.eval["recall"]  # [T, K, A, M]
    if iou_thr is not None:
        # Exact float comparison, as summarize does: 0.5 and 0.75 are values of np.linspace.
        values = values[np.where(iou_thr == params.iouThrs)[0]]
    values = values[..., area_index, det_index]
    value = float(np.mean(values[values > -1])) if (values > -1).any() else -1.0
    iou_text = (f"{params.iouThrs[0]:0.2f}:{params.iouThrs[-1]:0.2f}" if iou_thr is None
                else f"{iou_thr:0.2f}")
    line = _LINE.format("Average Precision" if ap else "Average Recall", "(AP)" if ap else "(AR)",
                        iou_text, area, max_det, value)
    return value, line


def _load_ground_truth(annotation_file_or_coco, coco_module):
    if isinstance(annotation_file_or_coco, coco_module.COCO):
        return annotation_file_or_coco
    if isinstance(annotation_file_or_coco, (str, os.PathLike)):
        path = os.fspath(annotation_file_or_coco)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"COCO annotation file {path!r} does not exist; pass the path of an "
                "instances_*.json or a pycocotools COCO object.")
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
            return coco_module.COCO(path)
    raise TypeError(
        "annotation_file_or_coco must be the path of a COCO annotation JSON or a pycocotools COCO "
        f"object; got {type(annotation_file_or_coco).__name__}.")


def _load_results(results):
    if isinstance(results, (str, os.PathLike)):
        with open(os.fspath(results)) as f:
            results = json.load(f)
    if not isinstance(results, list):
        raise TypeError(
            f"results must be a list of COCO result dicts or the path of a JSON file holding one; "
            f"got {type(results).__name__}.")
    return results


def stat_names(max_dets=DEFAULT_MAX_DETS) -> tuple[str, ...]:
    """The 12 numbers' keys in ``evaluate``'s result, in ``COCOeval.summarize``'s order."""
    return ("AP", "AP50", "AP75", "APs", "APm", "APl", *(f"AR{m}" for m in max_dets), "ARs", "ARm", "ARl")


def evaluate(annotation_file_or_coco, results, iou_type="bbox", max_dets=DEFAULT_MAX_DETS,
             image_ids=None):
    """Runs pycocotools' ``COCOeval`` on ``results`` and returns its 12 numbers and summary.

    Args:
      annotation_file_or_coco: path of a COCO ground-truth JSON, or a ``pycocotools.coco.COCO``
        (``COCOeval`` adds ``ignore`` flags to its annotations and, for ``"segm"``, turns their
        polygons into RLE in place).
      results: list of COCO result dicts (``to_coco_results``; for ``"segm"`` each with an RLE
        ``"segmentation"``, see ``masks_to_rle``), or the path of a JSON file holding one. The
        list is not modified.
      iou_type: ``"bbox"`` or ``"segm"``.
      max_dets: three increasing detections-per-image limits. AP rows and ``ARs/ARm/ARl`` use the
        last; the AR keys are named by the values, e.g. ``(1, 10, 300)`` gives ``AR1``, ``AR10``,
        ``AR300``. Raise the last above 100 when images hold more objects (the nuclei data has
        125 in one image).
      image_ids: COCO image ids to evaluate on; ``None`` evaluates every image of the ground
        truth. Images without detections count as misses, so a partial evaluation set must be
        named here.

    Returns:
      ``{"AP", "AP50", "AP75", "APs", "APm", "APl", f"AR{m0}", f"AR{m1}", f"AR{m2}", "ARs",
      "ARm", "ARl"}`` as floats in ``[0, 1]`` (-1 where no ground truth exists for the row, as in
      COCOeval), plus ``"summary"``: the 12-line text ``COCOeval.summarize`` prints, with each row
      at its ``max_dets`` value. No detections is not an error: every row with ground truth is 0,
      and the summary starts with a line saying there were no detections.
    """
    coco_module, cocoeval_module, _ = _import_pycocotools()
    if iou_type not in ("bbox", "segm"):
        raise ValueError(
            f"iou_type must be 'bbox' or 'segm'; got {iou_type!r}. (Keypoints are not supported.)")
    max_dets = _check_max_dets(max_dets)
    ground_truth = _load_ground_truth(annotation_file_or_coco, coco_module)
    results = _load_results(results)

    known_images = set(ground_truth.getImgIds())
    if image_ids is None:
        image_ids = sorted(known_images)
    else:
        image_ids = sorted({int(i) for i in np.asarray(image_ids).reshape(-1)})
        unknown = sorted(set(image_ids) - known_images)
        if not image_ids or unknown:
            raise ValueError(
                f"image_ids must be a non-empty subset of the ground truth's images; "
                f"{'got none' if not image_ids else f'{unknown[:10]} are not in it'}. Pass None "
                "to evaluate on every image.")

    key = "segmentation" if iou_type == "segm" else "bbox"
    required = {"image_id", "category_id", "score", key}
    detections = []
    for index, result in enumerate(results):
        if not isinstance(result, dict) or not required <= set(result):
            raise ValueError(
                f"results[{index}] must be a dict with 'image_id', 'category_id', 'score' and "
                f"{key!r} for iou_type={iou_type!r}; got {result!r:.200}.")
        # loadRes writes id, area and iscrowd into the dicts it gets: give it copies so that the
        # caller's list can be evaluated again (or written) unchanged.
        detection = copy.deepcopy(result)
        if iou_type == "segm":
            # With a bbox present loadRes would take the box area, not the mask area, for the
            # small/medium/large split (mmdetection drops it for the same reason).
            detection.pop("bbox", None)
        detections.append(detection)

    unknown = sorted({d["image_id"] for d in detections} - known_images)
    if unknown:
        raise ValueError(
            f"results hold detections for images that are not in the ground truth: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}. Evaluate against the annotation file the "
            "images came from, and drop padding slots (image id -1).")
    known_categories = set(ground_truth.getCatIds())
    unknown = sorted({d["category_id"] for d in detections} - known_categories)
    if unknown:
        # COCOeval would silently ignore them: a model whose labels were not mapped back would
        # score 0 with no hint why.
        raise ValueError(
            f"results hold category ids that are not in the ground truth: {unknown[:10]}. Map "
            "contiguous labels to COCO category ids (to_coco_results's category_ids).")

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if detections:
            detected = ground_truth.loadRes(detections)
        else:
            # loadRes([]) fails on anns[0]; an empty result set evaluated normally gives the
            # official numbers for "no detections" (0 where ground truth exists, -1 elsewhere).
            detected = coco_module.COCO()
            detected.dataset = {"images": list(ground_truth.dataset["images"]),
                                "categories": copy.deepcopy(ground_truth.dataset["categories"]),
                                "annotations": []}
            detected.createIndex()
        coco_eval = cocoeval_module.COCOeval(ground_truth, detected, iouType=iou_type)
        coco_eval.params.imgIds = image_ids
        coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()

    last = max_dets[-1]
    rows = [  # (ap, iou threshold, area, max detections) of stat_names, summarize's order
        (1, None, "all", last), (1, 0.5, "all", last), (1, 0.75, "all", last), (1, None, "small", last),
        (1, None, "medium", last), (1, None, "large", last), (0, None, "all", max_dets[0]),
        (0, None, "all", max_dets[1]), (0, None, "all", last), (0, None, "small", last),
        (0, None, "medium", last), (0, None, "large", last),
    ]
    stats = {}
    lines = []
    if not detections:
        lines.append(" No detections to evaluate: each row below is 0 where ground truth exists "
                     "(-1 where none does).")
    for name, (ap, iou_thr, area, max_det) in zip(stat_names(max_dets), rows):
        stats[name], line = _summary_row(coco_eval, ap, iou_thr, area, max_det)
        lines.append(line)
    stats["summary"] = "\n".join(lines) + "\n"
    return stats
