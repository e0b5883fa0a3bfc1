"""Necks: what turns a backbone's stages into the feature maps a task's heads read, shared by the
tasks as mmdet and mmseg share theirs (`necks/fpn.py`).

- `fpn`: mmdet's FPN, whose output op is any `SpatialOp` (the paper's neck variants): P2-P6 for
  the detectors, P2-P5 (`num_outs=4`) for Semantic FPN.
"""
