"""The poly learning-rate schedule of DeepLab and the paper's recipe: lr = base * (1 - iter / max_iter) ** power,
stepped every iteration, optionally after a linear warm-up (none in the paper's recipe, which starts from
ImageNet weights; a from-scratch network at a high lr needs a few hundred steps of it)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

# The warm-up starts at this fraction of the lr (mmsegmentation's default warmup_ratio is 1e-6; 0.1 trains as well
# and wastes fewer of a short run's steps).
WARMUP_START = 0.1


def poly_factor(iteration: int, max_iterations: int, power: float = 0.9, warmup_iterations: int = 0) -> float:
    """The multiplier of the initial lr at ``iteration``: linear from WARMUP_START to 1 over the warm-up, times
    the poly decay over the whole run (so the warm-up does not stretch the schedule)."""
    decay = max(0.0, 1.0 - iteration / max_iterations) ** power
    if iteration < warmup_iterations:
        return decay * (WARMUP_START + (1.0 - WARMUP_START) * iteration / warmup_iterations)
    return decay


def poly_schedule(optimizer: torch.optim.Optimizer, max_iterations: int, power: float = 0.9,
                  warmup_iterations: int = 0) -> LambdaLR:
    """A scheduler multiplying every parameter group's initial lr by :func:`poly_factor`.

    Call ``scheduler.step()`` once per optimizer step; its ``state_dict`` resumes it exactly.
    """
    if max_iterations <= 0:
        raise ValueError(f"max_iterations must be positive, got {max_iterations}")
    if warmup_iterations < 0:
        raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations}")
    return LambdaLR(optimizer, lambda it: poly_factor(it, max_iterations, power, warmup_iterations))
