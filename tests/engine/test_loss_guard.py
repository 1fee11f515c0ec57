"""LossGuard in one process: finite losses pass; the first non-finite one is the one named, whatever follows, and
nothing is synchronised until :meth:`check`. (Across ranks: test_collaborators_across_ranks.py; the trainer's stop
without a save: test_training.py.)"""

from __future__ import annotations

import pytest
import torch

from seg.engine.errors import TrainingError
from seg.engine.loss_guard import LossGuard


def test_finite_losses_pass_and_an_unused_guard_passes(tmp_path):
    LossGuard(1, tmp_path).check()
    guard = LossGuard(1, tmp_path)
    for iteration, value in enumerate([2.5, 1.0, 0.0], start=1):
        guard.note(torch.tensor(value), iteration)
    guard.check()


def test_the_first_non_finite_loss_is_named_with_its_value_and_the_kept_checkpoint(tmp_path):
    guard = LossGuard(1, tmp_path)
    for iteration, value in enumerate([1.0, 0.5, float("inf"), 0.3, float("nan")], start=1):
        guard.note(torch.tensor(value), iteration)
    with pytest.raises(TrainingError) as raised:
        guard.check()
    assert str(raised.value) == (f"the loss became inf at iteration 3; stopped without saving (the last good "
                                 f"checkpoint in {tmp_path} is intact); try a lower lr or amp off")
    with pytest.raises(TrainingError, match="at iteration 3;"):  # it stays raised: the run cannot go on
        guard.check()


def test_note_leaves_the_loss_on_its_device_and_keeps_no_graph(tmp_path):
    guard = LossGuard(1, tmp_path)
    weight = torch.ones((), requires_grad=True)
    guard.note(weight * float("nan"), 1)
    with pytest.raises(TrainingError, match="became nan at iteration 1;"):
        guard.check()
    assert not guard._bad_loss.requires_grad
