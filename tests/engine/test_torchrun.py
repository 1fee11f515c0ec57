"""``torchrun`` on CPU: two gloo processes train together, validation counts every image exactly once, and a worker
that dies is restarted (``--max-restarts``) and the run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from seg.data import build_dataset, eval_transforms
from seg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from seg.engine.evaluator import evaluate
from seg.engine.trainer import TEST_CRASH_VARIABLE


TWO_PROCESS_TRAINING = ["--dataset", "toy", "--iters", "4", "--batch-size", "2", "--crop-size", "48", "--base-size",
                        "64", "--workers", "0", "--eval-every", "4", "--log-every", "1"]


def torchrun(*args, restarts: int = 0, env=None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 --max-restarts=N -m seg.train ARGS`` on the CPU (gloo)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         f"--max-restarts={restarts}", "-m", "seg.train", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp")
    return output, torchrun(*TWO_PROCESS_TRAINING, "--val-limit", "7", "--output-dir", str(output))


def test_two_process_run_and_sharded_validation(two_process_run):
    output, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "total batch 4 = 2 x 2 process(es) x 1 accumulation" in result.stdout
    assert result.stdout.count("validation at iteration 4") == 1  # rank 0 reports, once
    logged = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines() if "mIoU" in line]
    assert len(logged) == 1

    # 7 images over 2 processes (4 + 3): the merged confusion matrix equals one process's over all 7.
    payload = load_checkpoint(output / "last.pth")
    assert len(payload["rng"]) == 2  # each rank's RNG state, for exact resume
    dataset = build_dataset("toy", "val", transforms=eval_transforms())
    dataset.samples = dataset.samples[:7]
    single = evaluate(model_from_checkpoint(payload), dataset, torch.device("cpu"), workers=0, progress=False)
    assert logged[0]["pixAcc"] == pytest.approx(single["pixAcc"], abs=1e-12)
    assert logged[0]["mIoU"] == pytest.approx(single["mIoU"], abs=1e-12)


def test_a_killed_worker_is_restarted_and_training_continues_from_the_last_checkpoint(two_process_run, tmp_path):
    # The test hook makes rank 1 SIGKILL itself after iteration 2, before that iteration's checkpoint, in the
    # first attempt only; torchrun then restarts both workers, and --resume auto takes them on from iteration 1.
    reference, _ = two_process_run
    output = tmp_path / "restarted"
    env = dict(os.environ, **{TEST_CRASH_VARIABLE: "2"})
    result = torchrun(*TWO_PROCESS_TRAINING, "--val-limit", "1", "--checkpoint-every", "1", "--resume", "auto",
                      "--output-dir", str(output), restarts=1, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from scratch" in result.stdout and "resumed at iteration 1" in result.stdout
    assert "exitcode: -9" in result.stderr  # rank 1 really died of SIGKILL
    final, expected = load_checkpoint(output / "last.pth"), load_checkpoint(reference / "last.pth")
    assert final["iteration"] == expected["iteration"] == 4
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), f"{key} differs after the restart"
