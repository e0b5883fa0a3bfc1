"""Training: optimizer and schedule (`optim`), the jitted steps (`steps`), orbax checkpoints
(`checkpoint`), metric logging (`metrics`) and the loop that ties them (`loop`)."""
