"""ImageNet-shaped training on random data, for a first run on a new device (`kernels.gpu_check`).

    python -m experiments.imagenet --config experiments/configs/imagenet_synthetic.py --workdir runs/synthetic
    python -m experiments.imagenet --config experiments/configs/imagenet_synthetic.py:smoke --workdir /tmp/s  # CPU, seconds

Images of ImageNet's shape (224x224x3) and 1000 classes, drawn at random (`data.name =
"synthetic"`): nothing to download or decode. CedNet-26 in bfloat16 with Pallas kernels on a GPU,
batch 64 over every local device, 50 steps, then a checkpoint and an evaluation. It shows that
sharded training, checkpointing, restoring and evaluation run on a device, and nothing about
accuracy: the labels are random, so the loss stays near ln(1000) = 6.9 and top-1 near 0.1%.
`:smoke` shrinks it to 16x16 images, 10 classes and a two-stage ResNet (convolutions compile in
half the time of C-volution on a CPU) for 4 steps: the command checked in seconds, not the model.
"""

from experiments.configs import common


def get_config(size: str = "full"):
    if size not in ("full", "smoke"):
        raise ValueError(f"imagenet_synthetic: unknown size {size!r}; append nothing (full) or ':smoke' to the config path.")
    config = common.base_config()
    config.model.name = "cednet26"
    config.data.name = "synthetic"
    config.data.image_size = 224
    config.data.num_classes = 1000
    config.data.num_examples = 512  # the eval split too: 8 batches
    config.dtype = "bfloat16"
    config.batch_size = 64
    config.num_train_steps = 50
    config.warmup_epochs = 0.0
    config.log_every_steps = 10
    config.eval_every_steps = 50
    config.checkpoint_every_steps = 50
    if size == "smoke":
        config.model.name = "resnet50"
        config.model.overrides = {"stem": "small", "stem_width": 32, "widths": (16, 16), "stage_sizes": (1, 1)}
        config.data.update(image_size=16, num_classes=10, num_examples=32)
        config.dtype = "float32"
        config.batch_size = 8
        config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 4
        config.log_every_steps = 2
    return config
