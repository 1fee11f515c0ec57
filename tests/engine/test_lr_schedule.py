"""The poly schedule with its optional linear warm-up."""

from __future__ import annotations

import pytest
import torch

from seg.engine.lr_schedule import WARMUP_START, poly_factor, poly_schedule


def _lrs(iterations: int, warmup: int):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = poly_schedule(optimizer, iterations, 0.9, warmup)
    lrs = []
    for _ in range(iterations):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer.param_groups[0]["lr"]


def test_without_warmup_it_is_the_paper_poly():
    lrs, final = _lrs(20, 0)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1 * 0.5 ** 0.9)
    assert final == 0.0


def test_warmup_rises_linearly_then_joins_the_poly_decay():
    lrs, final = _lrs(40, 10)
    assert lrs[0] == pytest.approx(0.1 * WARMUP_START)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    for it in range(10, 40):
        assert lrs[it] == pytest.approx(0.1 * (1 - it / 40) ** 0.9)
    assert final == 0.0
    assert poly_factor(5, 40, 0.9, 10) == pytest.approx((1 - 5 / 40) ** 0.9 * (WARMUP_START + (1 - WARMUP_START) / 2))


def test_schedule_state_resumes_exactly():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = poly_schedule(optimizer, 30, 0.9, 8)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    fresh = poly_schedule(fresh_optimizer, 30, 0.9, 8)
    fresh.load_state_dict(state)
    for _ in range(3):
        optimizer.step(), scheduler.step(), fresh_optimizer.step(), fresh.step()
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
