"""The poly learning-rate schedule of DeepLab and the paper's recipe: lr = base * (1 - iter / max_iter) ** power,
stepped every iteration, no warmup."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def poly_schedule(optimizer: torch.optim.Optimizer, max_iterations: int, power: float = 0.9) -> LambdaLR:
    """A scheduler multiplying every parameter group's initial lr by ``(1 - it / max_iterations) ** power``.

    Call ``scheduler.step()`` once per optimizer step; its ``state_dict`` resumes it exactly.
    """
    if max_iterations <= 0:
        raise ValueError(f"max_iterations must be positive, got {max_iterations}")
    return LambdaLR(optimizer, lambda it: max(0.0, 1.0 - it / max_iterations) ** power)
