"""The tasks the runner (`cvolution_jax.train.loop`) trains and evaluates, one small module each:
its config check, model, data, loss (train step) and evaluator.

- `classification`: image classification on `cvolution_jax.data`'s datasets (`experiments/imagenet.py`).
- `detection`: Faster / Mask R-CNN on COCO-format data, COCOeval metrics (`experiments/coco.py`).
- `segmentation`: Semantic FPN / UPerNet, mIoU from one confusion matrix (`experiments/cityscapes.py`).
- `pretrained`: a backbone initialised from an `experiments.imagenet` run (detection and segmentation).
"""
