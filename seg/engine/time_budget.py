"""Fitting a training schedule to a wall-clock budget (``seg.train --time-budget MINUTES``).

A short probe measures what the run will spend its time on: one optimizer step, one validation, one checkpoint
save, the end-of-run pictures. The largest iteration count whose steps, validations and saves fit in what is left
of the budget (less the pictures, a small reserve and a safety margin) becomes the run's ``iters``. It is stored in the
checkpoint with the rest of the config, so a resumed run keeps the schedule it started with; the poly decay
therefore always reaches zero, and the run ends inside the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

# Seconds kept beyond what the probe measured: the process's exit, the final messages.
FINISH_RESERVE_S = 3.0
# Fraction of the remaining budget left unplanned: step times drift by a few percent over a run (measured: a
# ResNet-50 run stepped 6 % slower than its probe, its data loading competing with it for the 2 cores).
SAFETY_MARGIN = 0.08


@dataclass(frozen=True)
class ProbeTimes:
    """What the probe measured, in seconds."""

    step: float  # one optimizer step (all its micro-batches), data loading included
    validation: float  # one full validation
    save: float  # one checkpoint write
    pictures: float  # the end-of-run pictures (curves, per-class IoU, confusion matrix, prediction panels)
    elapsed: float  # budget already spent when the probe ended (start-up, data listing, model build, probe)

    def describe(self) -> str:
        return (f"{self.step:.2f} s/step, {self.validation:.1f} s/validation, {self.save:.1f} s/checkpoint, "
                f"{self.pictures:.1f} s for the pictures")


class BudgetTooShortError(ValueError):
    """Not even one step, its validation and its checkpoint fit in the budget."""


def fit_iterations_to_budget(budget_s: float, times: ProbeTimes,
                             events_for: Callable[[int], Tuple[int, int]]) -> int:
    """The largest iteration count ``n`` whose planned time fits in the budget.

    Args:
        budget_s: the whole budget in seconds.
        times: the probe's measurements.
        events_for: ``n -> (validations, checkpoint saves)`` that a run of ``n`` iterations makes (they depend on
            ``n`` through the derived ``eval_every`` and ``checkpoint_every``).

    Raises:
        BudgetTooShortError: not even one iteration fits.
    """
    available = (budget_s - times.elapsed - times.pictures - FINISH_RESERVE_S) * (1.0 - SAFETY_MARGIN)

    def planned(n: int) -> float:
        validations, saves = events_for(n)
        return n * times.step + validations * times.validation + saves * times.save

    if available <= 0 or planned(1) > available:
        raise BudgetTooShortError(
            f"a time budget of {budget_s / 60:g} min is too short: {times.elapsed:.0f} s went to start-up and the "
            f"probe, and one iteration with its validation needs {planned(1):.0f} s more ({times.describe()})")
    # planned() grows with n (the derived intervals only round it): bisect below the steps-only bound.
    low, high = 1, max(1, math.floor(available / times.step))
    while low < high:
        middle = (low + high + 1) // 2
        if planned(middle) <= available:
            low = middle
        else:
            high = middle - 1
    return low


def events_of_schedule(iters: int, eval_every: int, checkpoint_every: int) -> Tuple[int, int]:
    """(validations, saves) of a run of ``iters`` steps: a validation every ``eval_every`` and at the end, a save
    every ``checkpoint_every``, at the end, and (at most) one ``best.pth`` per validation."""
    validations = iters // eval_every + (1 if iters % eval_every else 0)
    saves = iters // checkpoint_every + (1 if iters % checkpoint_every else 0) + validations
    return validations, saves
