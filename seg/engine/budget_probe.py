"""Fitting a trainer's schedule to ``time_budget``: measure what the run will spend its time on, on the real
model and data, then fix ``iters`` (:func:`fit_to_time_budget`).

It exists apart from the loop because measuring is not training: the probe takes a few real steps, a validation
on a few images, a checkpoint save and the end-of-run pictures, then puts the weights, optimiser, scaler and RNG
states back, so the run starts as if it had not happened (a budgeted run and a plain run of the same ``iters``
end with the same weights). The arithmetic of the fit is :mod:`seg.engine.time_budget`'s.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Tuple

import torch
import torch.distributed as dist

from .checkpoint import restore_rng_state, rng_state
from .errors import TrainingError
from .evaluator import evaluate
from .time_budget import BudgetTooShortError, ProbeTimes, events_of_schedule, fit_iterations_to_budget

if TYPE_CHECKING:
    from .trainer import Trainer

# Seconds a validation's DataLoader takes to start its workers (not measured by the probe, which runs without).
LOADER_START_S = 1.0


def probe_times(trainer: "Trainer", warmup_steps: int = 2, timed_steps: int = 6, timed_images: int = 4
                ) -> ProbeTimes:
    """Measure a step, a validation and a checkpoint save on ``trainer``'s model and data, then put back the
    weights, optimiser, scaler and RNG states, so the run starts as if the probe had not happened."""
    cfg, ctx = trainer.cfg, trainer.context
    saved_rng = rng_state()
    saved = (copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(trainer.optimizer.state_dict()),
             copy.deepcopy(trainer.scaler.state_dict()))
    trainer.network.train()
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader)
    step_times = []
    for _ in range(min(warmup_steps + timed_steps, trainer.steps_per_epoch)):
        tick = time.perf_counter()
        loss = trainer.train_step(batches)
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        loss.item()  # waits for the device
        step_times.append(time.perf_counter() - tick)
    # The mean, not the median: a step that waits for data counts (the loader's workers share the cores).
    step = statistics.mean(step_times[warmup_steps:] or step_times)
    del batches

    # A validation: after a warm-up pass (first-call costs: kernel choices, padding timings), a few images in
    # the main process give the cost per image (decoding included, which the real validation's workers
    # overlap: an overestimate on the safe side); the largest shard decides, plus the workers' start-up.
    def validation_seconds(count: int) -> float:
        subset = copy.copy(trainer.val_set)
        subset.samples = trainer.val_set.samples[:count]
        tick = time.perf_counter()
        trainer.last_metrics = evaluate(trainer.model, subset, ctx.device, trainer.validation_inference, workers=0,
                                        channels_last=cfg.channels_last, progress=False)
        return time.perf_counter() - tick

    validation_seconds(1)
    count = min(timed_images, len(trainer.val_set))
    per_image = validation_seconds(count) / count
    validation = per_image * math.ceil(len(trainer.val_set) / ctx.world_size) + LOADER_START_S
    trainer.network.train()

    tick = time.perf_counter()
    probe_file = trainer.save("probe.pth")
    save = time.perf_counter() - tick
    if probe_file is not None:
        probe_file.unlink(missing_ok=True)

    tick = time.perf_counter()
    if ctx.is_main:
        with tempfile.TemporaryDirectory(dir=trainer.output_dir) as scratch:
            trainer.draw_pictures(Path(scratch))  # all of them: last_metrics holds the probe's validation
    pictures = time.perf_counter() - tick
    trainer.last_metrics = None

    trainer.model.load_state_dict(saved[0])
    trainer.optimizer.load_state_dict(saved[1])
    trainer.scaler.load_state_dict(saved[2])
    restore_rng_state(saved_rng)
    return ProbeTimes(step=step, validation=validation, save=save, pictures=pictures,
                      elapsed=time.monotonic() - trainer.started_at)


def fit_to_time_budget(trainer: "Trainer") -> None:
    """Fix ``trainer``'s ``iters`` so the run, its validations and checkpoints included, ends within
    ``cfg.time_budget`` minutes (the rank-0 estimate, shared by every rank); before the first step."""
    budget_s = 60.0 * trainer.cfg.time_budget
    times = probe_times(trainer)

    def events_for(iters: int) -> Tuple[int, int]:
        planned = trainer.config_for(iters)
        return events_of_schedule(iters, planned.eval_every, planned.checkpoint_every)

    try:
        iters = fit_iterations_to_budget(budget_s, times, events_for)
    except BudgetTooShortError as error:
        raise TrainingError(str(error)) from None
    if trainer.context.world_size > 1:
        shared = torch.tensor([iters], dtype=torch.long, device=trainer.context.device)
        dist.broadcast(shared, src=0)
        iters = int(shared.item())
    trainer.set_schedule(iters)
    validations, _ = events_for(iters)
    if trainer.context.is_main:
        print(f"time budget {trainer.cfg.time_budget:g} min: {times.describe()}, {times.elapsed:.0f} s spent "
              f"on start-up and the probe -> {iters} iterations, {validations} validation(s)", flush=True)
    trainer.run_log.write({"iteration": 0, "time_budget_min": trainer.cfg.time_budget, "probe_step_s": times.step,
                           "probe_validation_s": times.validation, "probe_save_s": times.save,
                           "probe_pictures_s": times.pictures, "probe_elapsed_s": times.elapsed, "iters": iters})
