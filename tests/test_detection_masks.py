"""Instance masks: crop, targets, pasting, RLE, and segm AP through COCOeval, against references
written here (per-pixel loops of the published formulas) and pycocotools."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cvolution_jax.data import coco, coco_files, shapes
from tests.conftest import coco_stream
from cvolution_jax.data import masks as host_masks
from cvolution_jax.detection import evaluation, mask_head


def bilinear_zero_padded(grid, y, x):
    """torch.grid_sample's bilinear read (padding zeros) of ``grid [h, w]`` at cell-centre coords (y, x)."""
    y0, x0 = math.floor(y), math.floor(x)
    value = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < grid.shape[0] and 0 <= xx < grid.shape[1]:
                value += wy * wx * grid[yy, xx]
    return value


def paste_reference(mask, box, height, width, threshold=0.5):
    """mmdet's ``_do_paste_mask``: normalised grid in [-1, 1] over the box, grid_sample with
    align_corners=False, threshold; one pixel at a time over the whole image."""
    x1, y1, x2, y2 = box
    size = mask.shape[0]
    out = np.zeros((height, width), bool)
    for r in range(height):
        for c in range(width):
            gx = (c + 0.5 - x1) / (x2 - x1) * 2 - 1
            gy = (r + 0.5 - y1) / (y2 - y1) * 2 - 1
            # align_corners=False: unnormalised coordinate ((g + 1) * size - 1) / 2.
            out[r, c] = bilinear_zero_padded(mask, ((gy + 1) * size - 1) / 2, ((gx + 1) * size - 1) / 2) >= threshold
    return out


def test_paste_masks_matches_grid_sample_reference():
    rng = np.random.default_rng(0)
    probabilities = rng.random((3, 7, 7))
    boxes = np.asarray([[3.3, 2.7, 17.9, 12.2], [0.0, 0.0, 24.0, 20.0], [-4.5, 15.2, 6.1, 26.0]])
    pasted = host_masks.paste_masks(probabilities, boxes, 22, 25)
    for d in range(3):
        np.testing.assert_array_equal(pasted[d], paste_reference(probabilities[d], boxes[d], 22, 25))


def test_paste_masks_rejects_a_threshold_below_half():
    with pytest.raises(ValueError, match="threshold must be >= 0.5"):
        host_masks.paste_masks(np.zeros((1, 4, 4)), np.zeros((1, 4)), 8, 8, threshold=0.3)


def test_crop_mask_samples_the_box_grid():
    rng = np.random.default_rng(1)
    full = (rng.random((30, 40)) > 0.5).astype(np.uint8)
    box = np.asarray([5.5, 3.25, 31.0, 21.75])
    size = 9
    crop = host_masks.crop_mask(full, box, size)
    for i in range(size):
        for j in range(size):
            y = box[1] + (i + 0.5) / size * (box[3] - box[1]) - 0.5
            x = box[0] + (j + 0.5) / size * (box[2] - box[0]) - 0.5
            assert crop[i, j] == pytest.approx(bilinear_zero_padded(full, y, x), abs=1e-6)


def roi_align_reference(full, roi, size):
    """mmcv's aligned RoIAlign (adaptive sampling, average) of one channel, one sample at a time."""
    height, width = full.shape
    x1, y1, x2, y2 = (v - 0.5 for v in roi)
    bin_h, bin_w = (y2 - y1) / size, (x2 - x1) / size
    gy, gx = math.ceil(bin_h), math.ceil(bin_w)
    out = np.zeros((size, size))
    for p in range(size):
        for q in range(size):
            total = 0.0
            for iy in range(gy):
                y = y1 + p * bin_h + (iy + 0.5) * bin_h / gy
                for ix in range(gx):
                    x = x1 + q * bin_w + (ix + 0.5) * bin_w / gx
                    if y < -1 or y > height or x < -1 or x > width:
                        continue
                    y_, x_ = min(max(y, 0), height - 1), min(max(x, 0), width - 1)
                    total += bilinear_zero_padded(full, y_, x_)
            out[p, q] = total / (gy * gx)
    return out


def test_mask_targets_from_crops_match_roi_align_of_the_full_mask():
    """mmdet aligns the image-size mask to the RoI; the box crop (binarised, at a resolution above
    the object's) gives the same 28x28 target but for a few border cells whose mmdet value is
    within 0.1 of the 0.5 threshold (the crop's own sampling moves them across it)."""
    yy, xx = np.mgrid[:60, :80]
    full = (((yy - 30) / 18.0) ** 2 + ((xx - 38) / 26.0) ** 2 <= 1).astype(np.uint8)  # an ellipse
    rows, cols = np.nonzero(full)
    gt_box = np.asarray([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)
    rois = np.asarray([[10.0, 10.0, 66.0, 50.0], [15.5, 14.0, 40.0, 47.5], gt_box], np.float32)
    crop = host_masks.crop_mask(full, gt_box, 112) >= 0.5
    targets = np.asarray(mask_head.mask_targets(jnp.asarray(rois), jnp.tile(jnp.asarray(gt_box), (3, 1)),
                                            jnp.tile(jnp.asarray(crop, jnp.uint8), (3, 1, 1)), 28))
    for roi, target in zip(rois, targets):
        reference = roi_align_reference(full.astype(np.float64), roi, 28)
        assert set(np.unique(target)) <= {0.0, 1.0}
        differ = target.astype(bool) != (reference >= 0.5)
        assert differ.mean() < 0.03
        assert np.all(np.abs(reference[differ] - 0.5) < 0.1), reference[differ]


def test_mask_loss_is_bce_of_the_ground_truth_class_over_positives():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 4, 4, 5)).astype(np.float32)
    labels = np.asarray([[1, 4, 0], [2, 2, 3]])
    targets = (rng.random((2, 3, 4, 4)) > 0.5).astype(np.float32)
    positive = np.asarray([[True, False, True], [True, True, False]])
    expected = []
    for b in range(2):
        for r in range(3):
            if positive[b, r]:
                z = logits[b, r, :, :, labels[b, r]]
                t = targets[b, r]
                expected.append(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
    got = mask_head.loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(targets), jnp.asarray(positive))
    assert float(got) == pytest.approx(np.mean(expected), rel=1e-5)


def test_masks_to_rle_round_trips_through_pycocotools():
    rng = np.random.default_rng(3)
    binary = rng.random((4, 13, 17)) > 0.6
    rles = evaluation.masks_to_rle(binary)
    for mask, rle in zip(binary, rles):
        np.testing.assert_array_equal(mask_utils.decode(rle), mask)
        direct = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle["counts"] == direct["counts"].decode("ascii") and rle["size"] == list(direct["size"])


def test_decode_segmentation_reads_polygons_and_both_rle_forms():
    polygon = [[2.0, 2.0, 12.0, 2.0, 12.0, 9.0, 2.0, 9.0]]
    from_polygon = host_masks.decode_segmentation(polygon, 12, 15)
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 12, 15)))
    np.testing.assert_array_equal(from_polygon, expected)
    compressed = mask_utils.encode(np.asfortranarray(from_polygon))
    np.testing.assert_array_equal(host_masks.decode_segmentation(compressed, 12, 15), from_polygon)
    # Uncompressed RLE: run lengths in column-major order, starting with zeros.
    flat = from_polygon.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    np.testing.assert_array_equal(host_masks.decode_segmentation({"size": [12, 15], "counts": counts}, 12, 15),
                                  from_polygon)
    with pytest.raises(ValueError, match="polygons .* or RLE"):
        host_masks.decode_segmentation({"points": []}, 12, 15)


def test_ground_truth_masks_as_detections_give_segm_ap_one(tmp_path):
    """The whole path the evaluation takes: box crops from the data pipeline, pasted back into
    the original image by to_coco_results, RLE, COCOeval segm."""
    shapes.write_shapes(tmp_path, num_train=1, num_val=12, image_size=96, seed=3)
    dataset = coco.load_coco(**coco_files.split_paths(tmp_path, "val"))
    batch = next(iter(coco_stream(dataset, train=False, batch_size=12, scale=(96, 96), buckets=((96, 96),), max_gt=8,
                                  mask_size=96)))
    sizes = {r.image_id: (r.height, r.width) for r in dataset.records}
    results = evaluation.to_coco_results(
        batch["image_id"], batch["boxes"], np.ones(batch["labels"].shape), np.maximum(batch["labels"], 0),
        batch["gt_valid"], batch["scale"], dataset.category_ids, masks=batch["masks"].astype(np.float32),
        image_shapes=[sizes[int(i)] for i in batch["image_id"]])
    assert len(results) == int(batch["gt_valid"].sum()) > 20
    stats = evaluation.evaluate(dataset.annotation_file, results, iou_type="segm")
    assert stats["AP"] == pytest.approx(1.0)


def test_to_coco_results_with_masks_needs_the_original_image_shapes():
    args = ([1], np.asarray([[[0.0, 0.0, 4.0, 4.0]]]), [[0.9]], [[0]], [[True]], [[1.0, 1.0]], [1])
    with pytest.raises(ValueError, match=r"image_shapes must be \[B, 2\]"):
        evaluation.to_coco_results(*args, masks=np.ones((1, 1, 7, 7)))
    with pytest.raises(ValueError, match=r"masks must have shape \[B, D, m, m\]"):
        evaluation.to_coco_results(*args, masks=np.ones((1, 7, 7)), image_shapes=[[8, 8]])
    (result,) = evaluation.to_coco_results(*args, masks=np.ones((1, 1, 7, 7)), image_shapes=[[8, 8]])
    expected = np.zeros((8, 8), np.uint8)
    expected[:4, :4] = 1
    np.testing.assert_array_equal(mask_utils.decode(result["segmentation"]), expected)
