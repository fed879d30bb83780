"""The training engine: loop, optimizers, checkpoints, distributed helpers, meters."""
