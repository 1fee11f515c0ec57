"""``--deterministic``: the same seed on the same machine gives bitwise the same weights and the same metrics.

Two short CPU training runs in deterministic mode, one in a separate process and one in this one (so that
anything that varies between processes, such as Python's hash seed, would show), must end with identical weights,
optimizer state, losses and validation metrics. ``seg.engine.determinism`` is checked for the settings it takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import TINY_TRAINING

from seg.engine.checkpoint import load_checkpoint
from seg.engine.determinism import CUBLAS_DETERMINISTIC_WORKSPACE, enable_determinism

# The tiny run, shortened (3 steps, validation at the end on 6 images) to keep two runs cheap; still every
# operation of a training step and of validation runs, and a difference anywhere reaches the weights.
DETERMINISTIC_RUN = [*TINY_TRAINING, "--deterministic", "--iters", "3", "--eval-every", "3", "--val-limit", "6"]
# Log fields measured with a clock, the only ones allowed to differ.
TIMING_KEYS = {"images_per_s"}


@pytest.fixture
def restore_determinism_settings(monkeypatch):
    """Put the process-wide switches back, so a deterministic run here leaves the other tests as they were."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    enabled, warn_only, benchmark, cudnn_deterministic = saved
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, cudnn_deterministic


def logged_records(output: Path) -> List[Dict[str, object]]:
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]


def assert_same_tensors(first: Dict[str, torch.Tensor], second: Dict[str, torch.Tensor], what: str) -> None:
    assert first.keys() == second.keys(), what
    for key, value in first.items():
        assert torch.equal(value, second[key]), f"{what}: {key} differs"


def test_two_deterministic_cpu_runs_give_bitwise_identical_weights_and_metrics(
    tmp_path, capsys, restore_determinism_settings
):
    from seg.train import main

    separate, here = tmp_path / "separate_process", tmp_path / "this_process"
    process = subprocess.Popen([sys.executable, "-m", "seg.train", *DETERMINISTIC_RUN, "--output-dir", str(separate)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert main([*DETERMINISTIC_RUN, "--output-dir", str(here)]) == 0, capsys.readouterr().err[-2000:]
        assert torch.are_deterministic_algorithms_enabled(), "--deterministic did not reach the trainer"
    finally:
        _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]

    first, second = load_checkpoint(separate / "last.pth"), load_checkpoint(here / "last.pth")
    assert first["iteration"] == second["iteration"] == 3
    assert_same_tensors(first["model"], second["model"], "weights")
    momentum = [{str(k): v["momentum_buffer"] for k, v in run["optimizer"]["state"].items()} for run in (first, second)]
    assert momentum[0], "the optimizer holds no momentum buffers to compare"
    assert_same_tensors(momentum[0], momentum[1], "SGD momentum")
    assert first["best_miou"] == second["best_miou"]

    records = logged_records(separate)
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["iteration"] for r in records if "mIoU" in r] == [3]
    assert records == logged_records(here)  # every loss, learning rate and validation metric, exactly


def test_enable_determinism_takes_every_setting(restore_determinism_settings):
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False

    enable_determinism("cpu")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC_WORKSPACE
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # on the CPU nothing may fall back
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True

    # On CUDA the operations without a deterministic kernel (bilinear upsampling backward, nll_loss2d) must
    # warn, not stop training; a workspace setting the user chose is kept.
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    enable_determinism(torch.device("cuda"))  # only reads the device type: no GPU is needed
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
