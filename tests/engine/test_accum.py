"""``--accum 2 --batch-size 2``: one optimizer step per 4 images, the step of ``--batch-size 4`` on the same 4 images
with its gradient the mean of its two halves' gradients.

BatchNorm in training mode normalises each micro-batch by that micro-batch's statistics, so no run of batch 4 can
end with the accumulating run's weights: the reference is the batch-4 trainer's own model, optimiser, schedule and
data, stepped once per batch of 4 on the mean of its halves' gradients (each half through the model on its own, as
a micro-batch is). Dropout stays on: both draw their masks from the same seed in the same order, half by half.
"""

from __future__ import annotations

import subprocess
import sys

import torch

from seg.config import build_config
from seg.engine.checkpoint import load_checkpoint
from seg.engine.loss import segmentation_loss
from seg.engine.trainer import Trainer

ITERATIONS = 2
SETTINGS = {"dataset": "toy", "iters": ITERATIONS, "crop_size": 48, "base_size": 64, "workers": 0, "val_limit": 1,
            "log_every": 1}


def command_line(settings: dict) -> list:
    """``settings`` as seg.train flags."""
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def step_on_halves(trainer: Trainer) -> dict:
    """Train ``trainer`` (batch 4) for its iterations, each one optimizer step on the mean of the gradients of its
    batch's two halves; returns the model's final state."""
    model, optimizer, scheduler = trainer.model, trainer.optimizer, trainer.scheduler
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader)
    model.train()
    for _ in range(trainer.cfg.iters):
        optimizer.zero_grad(set_to_none=True)
        batch = next(batches)
        assert batch["image"].shape[0] == 4
        for half in (slice(0, 2), slice(2, 4)):
            loss = segmentation_loss(model(batch["image"][half]), batch["mask"][half], trainer.cfg.aux_weight)
            (loss / 2).backward()
        optimizer.step()
        scheduler.step()
    return model.state_dict()


def test_accumulating_two_micro_batches_is_one_step_on_the_batch_of_four(tmp_path):
    output = tmp_path / "accumulated"
    result = subprocess.run([sys.executable, "-m", "seg.train", *command_line(SETTINGS), "--batch-size", "2",
                             "--accum", "2", "--output-dir", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "total batch 4 = 2 x 1 process(es) x 2 accumulation" in result.stdout
    accumulated = load_checkpoint(output / "last.pth")
    assert accumulated["iteration"] == ITERATIONS

    with torch.random.fork_rng():  # the trainer seeds the global RNG; leave this process's as it was
        reference = Trainer(build_config({**SETTINGS, "batch_size": 4, "output_dir": str(tmp_path / "reference")}))
        assert accumulated["config"]["lr"] == reference.cfg.lr  # the lr of total batch 4
        expected = step_on_halves(reference)

    assert accumulated["model"].keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):  # two micro-batches per step, each one BatchNorm update
            assert int(value) == 2 * ITERATIONS and torch.equal(accumulated["model"][key], value), key
            continue
        torch.testing.assert_close(accumulated["model"][key], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
