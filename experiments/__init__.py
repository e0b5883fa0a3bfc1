"""Entry points (`python -m experiments.imagenet ...`) and their configs (`experiments/configs/`)."""
