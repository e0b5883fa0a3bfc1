"""The task-agnostic runner: the loop (`loop`: mesh, state, checkpoints, `fit`, eval scheduling,
divergence), orbax checkpoints (`checkpoint`), metric logging (`metrics`), config checks, the
train state (`steps`), the one SGD builder, each task passing its schedule (`optim`), and the entry points'
flags (`cli`). The tasks it runs live in `cvolution_jax.tasks`."""
