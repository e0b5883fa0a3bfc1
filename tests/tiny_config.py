"""The default digits config shrunk to seconds for tests: 16x16 images, two one-block stages, K=3.

    python -m experiments.imagenet --config tests/tiny_config.py --workdir /tmp/tiny
"""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.model.overrides = {"stem": "small", "stem_width": 32, "widths": (16, 16), "stage_sizes": (1, 1),
                             "op_kwargs": (("kernel_size", 3),)}
    config.data.image_size = 16
    config.batch_size = 32
    config.num_train_steps = 12
    config.eval_every_steps = 6
    config.log_every_steps = 3
    config.checkpoint_every_steps = 4
    return config
