"""Engine: the training loop, evaluation, metrics, checkpoints, distributed helpers and the LR schedule."""
