"""``torchrun`` on CPU: two gloo processes train together, and validation counts every image exactly once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from seg.data import build_dataset, eval_transforms
from seg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from seg.engine.evaluator import evaluate


def test_two_process_run_and_sharded_validation(tmp_path):
    output = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "seg.train",
         "--dataset", "toy", "--iters", "4", "--batch-size", "2", "--crop-size", "48", "--base-size", "64",
         "--workers", "0", "--eval-every", "4", "--val-limit", "7", "--log-every", "1", "--output-dir", str(output)],
        capture_output=True, text=True, timeout=600,
    )
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
