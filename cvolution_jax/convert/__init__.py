"""Importers of weights trained elsewhere into this project's checkpoints.

`torch_rednet`: PyTorch RedNet (involution / mmcls) state dicts -> an orbax checkpoint that
`python -m experiments.imagenet --config.mode=eval` restores. Needs the optional `torch` extra
(`pip install -e ".[torch]"`), imported only when a `.pth` file is read.
"""
