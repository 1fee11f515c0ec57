"""``python -m seg.train`` end to end on the toy data: outputs, SIGTERM, NaN stop, bad input. (Exact resume after
SIGKILL and the other faults: test_faults.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING as TINY

from seg.engine.checkpoint import load_checkpoint


def train(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "seg.train", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def logged_iterations(output: Path):
    log = output / "log.jsonl"
    if not log.exists():
        return []
    return [json.loads(line)["iteration"] for line in log.read_text().splitlines() if '"loss"' in line]


@pytest.fixture
def uninterrupted(tiny_training_run):
    return tiny_training_run


def test_a_run_leaves_checkpoints_logs_and_pictures(uninterrupted):
    output, result = uninterrupted
    for name in ("last.pth", "best.pth", "log.jsonl", "curves.png", "prediction_overlay.png"):
        assert (output / name).is_file(), name
    pytest.importorskip("tensorboard", reason="TensorBoard event files are written only when it is installed")
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    assert "total batch 2 = 2 x 1 process(es) x 1 accumulation" in result.stdout
    checkpoint = load_checkpoint(output / "last.pth")
    assert checkpoint["iteration"] == 8 and checkpoint["classes"] == ["background", "disc", "box", "stripe"]
    assert checkpoint["model_config"]["backbone"] == "resnest14" and checkpoint["config"]["crop_size"] == 48
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert [r["iteration"] for r in records if "mIoU" in r] == [4, 8]
    assert "validation at iteration 8" in result.stdout or "validation at iteration 8" in result.stderr


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    output = tmp_path / "terminated"
    process = subprocess.Popen([sys.executable, "-m", "seg.train", *TINY, "--iters", "200", "--output-dir",
                                str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(logged_iterations(output)) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "continue with --resume auto" in stdout
    saved = load_checkpoint(output / "last.pth")
    assert 2 <= saved["iteration"] < 200


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    output = tmp_path / "diverged"
    result = train(*TINY, "--iters", "40", "--lr", "1e12", "--checkpoint-every", "1", "--eval-every", "100",
                   "--output-dir", str(output))
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the loss became") and "at iteration" in message
    assert "Traceback" not in result.stderr
    if (output / "last.pth").exists():  # the last good one, if any step succeeded, still loads
        assert load_checkpoint(output / "last.pth")["iteration"] >= 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "coco"], "--dataset 'coco' is unknown"),
        (["--backbone", "resnest51"], "--backbone 'resnest51' is unknown"),
        (["--dataset", "ade20k", "--data-root", "/nonexistent/ade"], "ade20k data not found at /nonexistent/ade"),
        (["--crop-size", "0"], "--crop-size must be positive"),
        (["--resume", "/nonexistent/last.pth"], "checkpoint /nonexistent/last.pth does not exist"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(args, message, tmp_path):
    result = train(*args, "--output-dir", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_without_network_the_default_weights_error_names_both_alternatives(shared, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "hub"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    result = train("--dataset", "camvid", "--data-root", str(shared("data", "camvid")), "--backbone", "resnest50",
                   "--iters", "1", "--output-dir", str(tmp_path / "out"), env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "resnest50-528c19ca.pth" in line and "--pretrained PATH" in line and "--pretrained none" in line
    assert "Traceback" not in result.stderr


def test_bf16_autocast_and_channels_last_train(tmp_path):
    output = tmp_path / "bf16"
    result = train(*TINY, "--iters", "3", "--eval-every", "3", "--amp", "bf16", "--channels-last",
                   "--output-dir", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = load_checkpoint(output / "last.pth")
    assert checkpoint["config"]["amp"] == "bf16" and checkpoint["config"]["channels_last"] is True
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values() if value.is_floating_point())
    assert 0 <= checkpoint["best_miou"] <= 1
