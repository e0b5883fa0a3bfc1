"""FPN anchors with mmdet v2's ``AnchorGenerator`` conventions (checked against
``mmdet/core/anchor/anchor_generator.py``, mmdetection 2.x):

- base size = the level's stride; for ratio ``r = h / w`` the anchor is
  ``w = stride * scale / sqrt(r)``, ``h = stride * scale * sqrt(r)`` (no rounding: v2 float
  anchors);
- ``center_offset = 0``: the anchor of feature cell ``(y, x)`` is centred on the pixel
  coordinate ``(x * stride, y * stride)``, not ``((x + 0.5) * stride, ...)``;
- ordering: cells row-major (y outer, x inner) and, within a cell, the ``A = len(ratios)``
  anchors in the order of ``ratios`` (mmdet's ``scale_major=True`` with one scale), so row
  ``(y * W + x) * A + a`` is cell ``(y, x)``, ratio ``a`` -- the order an NHWC head output
  ``[H, W, A * k]`` reshapes to.
"""


import jax.numpy as jnp


def feature_size(image_size, stride):
    """``(H_l, W_l)`` of the level with ``stride`` for a padded ``image_size = (H, W)``.

    Every stride-2 layer of the backbone and of the FPN's extra level (3x3 conv with padding 1,
    the stem's 7x7 with padding 3, 3x3 max-pool with padding 1, 1x1 max-pool) maps ``n`` to
    ``ceil(n / 2)``, and nested ceilings of halvings equal ``ceil(n / stride)``.
    """
    return tuple(-(-int(n) // stride) for n in image_size)


def anchors_for_levels(image_size, strides=(4, 8, 16, 32, 64), scale=8, ratios=(0.5, 1.0, 2.0)):
    """Anchors of every FPN level for one padded image size.

    Args:
      image_size: ``(height, width)`` of the padded input, Python ints (static).
      strides: the stride of each level (P2-P6 by default); also each level's base size.
      scale: anchor side over stride for ratio 1 (mmdet's ``scales=[8]``).
      ratios: height / width of the anchors at each position.

    Returns:
      A list, one per level, of float32 ``[H_l * W_l * A, 4]`` anchors ``(x1, y1, x2, y2)``
      with ``(H_l, W_l) = feature_size(image_size, stride)`` and ``A = len(ratios)``, ordered
      as the module docstring says.
    """
    if len(image_size) != 2 or any(int(n) != n or n <= 0 for n in image_size):
        raise ValueError(f"image_size must be (height, width), positive ints; got {image_size!r}.")
    if not strides or any(int(s) != s or s <= 0 for s in strides):
        raise ValueError(f"strides must be positive ints; got {strides!r}.")
    if not ratios or any(r <= 0 for r in ratios) or scale <= 0:
        raise ValueError(
            f"scale and ratios must be positive; got scale={scale!r}, ratios={ratios!r}.")
    levels = []
    for stride in strides:
        stride = int(stride)
        # Same float32 arithmetic order as mmdet (sqrt of the ratio, then w * w_ratio * scale,
        # then +-0.5 * size, then + shift), so anchors match its to the last bit.
        h_ratios = jnp.sqrt(jnp.asarray(ratios, jnp.float32))
        w_ratios = 1 / h_ratios
        ws = stride * w_ratios * jnp.float32(scale)
        hs = stride * h_ratios * jnp.float32(scale)
        base = jnp.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=-1)  # [A, 4]
        height, width = feature_size(image_size, stride)
        shift_x = jnp.arange(width, dtype=jnp.float32) * stride
        shift_y = jnp.arange(height, dtype=jnp.float32) * stride
        xx = jnp.broadcast_to(shift_x[None, :], (height, width)).reshape(-1)
        yy = jnp.broadcast_to(shift_y[:, None], (height, width)).reshape(-1)
        shifts = jnp.stack([xx, yy, xx, yy], axis=-1)  # [H * W, 4]
        levels.append((base[None, :, :] + shifts[:, None, :]).reshape(-1, 4))
    return levels
