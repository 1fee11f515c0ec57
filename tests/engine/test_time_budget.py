"""``seg.train --time-budget``: the planned schedule fits, the run ends inside the budget with its lr decayed to
zero, and a resumed run keeps the schedule its probe fixed (and ends with the weights of a plain run of it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seg.engine.time_budget import (FINISH_RESERVE_S, SAFETY_MARGIN, BudgetTooShortError, ProbeTimes,
                                    events_of_schedule, fit_iterations_to_budget)

# seg.train that SIGKILLs itself after the iteration in CRASH_VARIABLE (tests/crash_after_iteration.py).
CRASH_SCRIPT = str(Path(__file__).resolve().parents[1] / "crash_after_iteration.py")
CRASH_VARIABLE = "SEG_TEST_CRASH_AT_ITERATION"

BUDGET_RUN = ["--dataset", "toy", "--batch-size", "2", "--crop-size", "48", "--base-size", "64", "--workers", "0",
              "--log-every", "1", "--seed", "5", "--val-limit", "4"]


def test_fit_is_the_largest_count_that_fits():
    times = ProbeTimes(step=0.5, validation=4.0, save=1.0, pictures=4.0, elapsed=20.0)

    def events(n):
        return events_of_schedule(n, eval_every=max(1, -(-n // 5)), checkpoint_every=max(1, -(-n // 5)))

    def planned(n):
        validations, saves = events(n)
        return n * 0.5 + validations * 4.0 + saves * 1.0

    available = (600 - 20 - 4.0 - FINISH_RESERVE_S) * (1 - SAFETY_MARGIN)
    n = fit_iterations_to_budget(600, times, events)
    assert planned(n) <= available < planned(n + 1)
    assert n > 900  # most of the budget goes to steps


def test_fit_counts_frequent_saves():
    # A save every 2 steps costs more than the steps themselves: the count must still be the largest that fits.
    times = ProbeTimes(step=0.3, validation=1.0, save=0.8, pictures=1.0, elapsed=6.0)

    def events(n):
        return events_of_schedule(n, eval_every=max(1, -(-n // 5)), checkpoint_every=2)

    available = (30 - 6 - 1.0 - FINISH_RESERVE_S) * (1 - SAFETY_MARGIN)
    n = fit_iterations_to_budget(30, times, events)

    def planned(k):
        validations, saves = events(k)
        return k * 0.3 + validations * 1.0 + saves * 0.8

    assert n > 10 and planned(n) <= available < planned(n + 1)


def test_events_count_the_final_validation_and_the_best_checkpoints():
    assert events_of_schedule(10, eval_every=4, checkpoint_every=4) == (3, 6)
    assert events_of_schedule(8, eval_every=4, checkpoint_every=2) == (2, 6)


def test_too_short_a_budget_says_why():
    times = ProbeTimes(step=2.0, validation=30.0, save=1.0, pictures=3.0, elapsed=25.0)
    with pytest.raises(BudgetTooShortError, match=r"a time budget of 1 min is too short.*30.0 s/validation"):
        fit_iterations_to_budget(60, times, lambda n: (1, 2))


def _train(output, *extra, env=None, timeout=300, program=("-m", "seg.train")):
    command = [sys.executable, *program, *BUDGET_RUN, "--output-dir", str(output), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _records(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def test_a_budgeted_run_ends_inside_its_budget_with_a_complete_schedule(tmp_path):
    budget_min = 0.5
    start = time.monotonic()
    result = _train(tmp_path, "--time-budget", str(budget_min))
    wall = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-2000:]
    assert wall <= 60 * budget_min, f"took {wall:.1f} s of a {60 * budget_min:.0f} s budget"
    records = _records(tmp_path)
    probe = [r for r in records if "probe_step_s" in r]
    assert len(probe) == 1
    iters = probe[0]["iters"]
    trained = [r for r in records if "loss" in r]
    assert trained[-1]["iteration"] == iters and trained[-1]["lr"] == 0.0  # the poly decay ran to its end
    assert len([r for r in records if "mIoU" in r]) == 5  # the default for a budget: five validations
    checkpoint = torch.load(tmp_path / "last.pth", weights_only=True)
    assert checkpoint["config"]["iters"] == iters and checkpoint["iteration"] == iters
    assert checkpoint["config"]["time_budget"] == budget_min
    # The probe's estimate is used, not wasted: most of the budget went to the run.
    assert wall > 0.5 * 60 * budget_min
    assert f"-> {iters} iterations" in result.stdout


def test_resume_keeps_the_probed_schedule_and_is_exact(tmp_path):
    crashed = _train(tmp_path / "run", "--time-budget", "0.5", "--checkpoint-every", "2",
                     env={CRASH_VARIABLE: "3"}, program=(CRASH_SCRIPT,))
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    stored = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert stored["iteration"] == 2
    iters = stored["config"]["iters"]
    assert iters > 3

    resumed = _train(tmp_path / "run", "--time-budget", "0.5", "--checkpoint-every", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "time budget" not in resumed.stdout  # no second probe
    final = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert final["iteration"] == final["config"]["iters"] == iters

    # The same schedule without a budget: the probe left no trace in the weights, and the resume none either.
    plain = _train(tmp_path / "plain", "--iters", str(iters), "--checkpoint-every", "2")
    assert plain.returncode == 0, plain.stderr[-2000:]
    reference = torch.load(tmp_path / "plain" / "last.pth", weights_only=True)
    for name, tensor in reference["model"].items():
        assert torch.equal(final["model"][name], tensor), name
