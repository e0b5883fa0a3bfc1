"""anchors_for_levels against a numpy loop written from mmdet v2's AnchorGenerator, and its
docstring's values."""

import numpy as np
import pytest

from cvolution_jax.detection.anchors import anchors_for_levels


def numpy_anchors(image_size, stride, scale, ratios):
    height, width = (-(-n // stride) for n in image_size)
    out = []
    for y in range(height):
        for x in range(width):
            for r in ratios:
                w = stride * scale / np.sqrt(r)
                h = stride * scale * np.sqrt(r)
                cx, cy = x * stride, y * stride
                out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.array(out)


def test_matches_numpy_loop_on_all_levels():
    image_size = (70, 100)  # not a multiple of 64: feature sizes round up
    strides = (4, 8, 16, 32, 64)
    levels = anchors_for_levels(image_size, strides)
    assert [a.shape for a in levels] == [(18 * 25 * 3, 4), (9 * 13 * 3, 4), (5 * 7 * 3, 4),
                                         (3 * 4 * 3, 4), (2 * 2 * 3, 4)]
    for stride, anchors in zip(strides, levels):
        np.testing.assert_allclose(anchors, numpy_anchors(image_size, stride, 8, (0.5, 1, 2)),
                                   rtol=1e-6, atol=1e-4)


def test_hand_values_stride_4():
    anchors = np.asarray(anchors_for_levels((8, 8), strides=(4,))[0])
    s = 16 * np.sqrt(2)  # half the long side of a 32-pixel anchor of ratio 0.5 or 2
    t = 8 * np.sqrt(2)
    # Cell (0, 0): centred on pixel (0, 0); ratios 0.5, 1, 2 (height / width) in that order.
    np.testing.assert_allclose(anchors[:3], [[-s, -t, s, t], [-16, -16, 16, 16], [-t, -s, t, s]],
                               rtol=1e-6)
    # Row-major cells: row 1 is cell (y=0, x=1), shifted 4 pixels right; row 2 cell (1, 0).
    np.testing.assert_allclose(anchors[4], [-12, -16, 20, 16])
    np.testing.assert_allclose(anchors[7], [-16, -12, 16, 20])


def test_mmdet_docstring_example():
    # AnchorGenerator([16, 32], [1.], [1.], [9, 18]).grid_anchors([(2, 2), (1, 1)]): base sizes
    # 9 and 18 are stride * 9/16.
    levels = anchors_for_levels((32, 32), strides=(16, 32), scale=9 / 16, ratios=(1.0,))
    np.testing.assert_array_equal(levels[0], [[-4.5, -4.5, 4.5, 4.5], [11.5, -4.5, 20.5, 4.5],
                                              [-4.5, 11.5, 4.5, 20.5], [11.5, 11.5, 20.5, 20.5]])
    np.testing.assert_array_equal(levels[1], [[-9, -9, 9, 9]])


def test_rejects_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        anchors_for_levels((800,))
