"""``TrainingError``: the one exception by which training stops for a reason the user can act on.

It lives apart from the trainer so that the trainer's collaborators (the run log, the loss guard) can raise it
without importing the loop; ``seg.train`` prints its message as one line and exits with status 1.
"""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a dataset smaller than a batch); the message says why."""
