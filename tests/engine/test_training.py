"""``python -m seg.train`` end to end on the toy data: outputs, SIGTERM, NaN stop. (Exact resume after SIGKILL and
the other faults: test_faults.py; one-line user mistakes: tests/test_cli_errors.py.)"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING as TINY

from seg.engine.checkpoint import checkpoint_card, load_checkpoint


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
    assert "total batch 2 = 2 x 1 process(es) x 1 accumulation" in result.stdout
    checkpoint = load_checkpoint(output / "last.pth")
    card = checkpoint_card(checkpoint)
    assert checkpoint["iteration"] == 8 and card.classes == ("background", "disc", "box", "stripe")
    assert card.backbone == "resnest14" and checkpoint["config"]["crop_size"] == 48
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert [r["iteration"] for r in records if "mIoU" in r] == [4, 8]
    assert "validation at iteration 8" in result.stdout or "validation at iteration 8" in result.stderr


def test_checkpoints_carry_the_model_card_with_their_validation(uninterrupted):
    output, _ = uninterrupted
    validations = {r["iteration"]: r for r in map(json.loads, (output / "log.jsonl").read_text().splitlines())
                   if "mIoU" in r}
    for name in ("last.pth", "best.pth"):
        payload = load_checkpoint(output / name)
        assert not {"model_config", "classes", "palette", "normalisation", "dataset"} & set(payload), name
        (measured,) = checkpoint_card(payload, name).metrics  # the latest validation (best.pth: the best one)
        logged = validations[payload["iteration"]]
        assert (measured.iteration, measured.mIoU, measured.pixAcc) == (payload["iteration"], logged["mIoU"],
                                                                        logged["pixAcc"]), name
        assert (measured.dataset, measured.split, measured.inference) == ("toy", "val", "single-scale"), name
    assert load_checkpoint(output / "best.pth")["best_miou"] == validations[
        load_checkpoint(output / "best.pth")["iteration"]]["mIoU"]


def test_a_run_writes_its_logged_numbers_as_tensorboard_scalars(uninterrupted):
    pytest.importorskip("tensorboard", reason="TensorBoard event files are written only when it is installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = uninterrupted
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    for tag in ("loss", "mIoU"):
        logged = [(r["iteration"], r[tag]) for r in records if tag in r]
        scalars = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in scalars] == [step for step, _ in logged], tag
        assert torch.allclose(torch.tensor([v for _, v in scalars]), torch.tensor([v for _, v in logged])), tag


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


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    output = tmp_path / "diverged"
    result = train(*TINY, "--iters", "40", "--lr", "1e12", "--checkpoint-every", "1", "--eval-every", "100",
                   "--output-dir", str(output))
    assert result.returncode == 1, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    stopped = re.fullmatch(r"error: the loss became (\S+) at iteration (\d+); stopped without saving .*", message)
    assert stopped, message
    assert not math.isfinite(float(stopped[1]))
    bad_iteration = int(stopped[2])
    assert "Traceback" not in result.stderr
    # Iteration 1's loss comes from the initial weights, so the run goes bad at iteration 2 at the earliest; with a
    # save every iteration, the kept checkpoint is the one just before the bad iteration, with finite weights.
    assert 2 <= bad_iteration < 40
    kept = load_checkpoint(output / "last.pth")
    assert kept["iteration"] == bad_iteration - 1
    assert all(torch.isfinite(value).all() for value in kept["model"].values() if value.is_floating_point())
    assert max(logged_iterations(output)) < bad_iteration  # nothing was logged for the bad iteration either


def test_without_network_the_default_weights_error_names_both_alternatives(shared, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "hub"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    result = train("--dataset", "camvid", "--data-root", str(shared("data", "camvid")), "--backbone", "resnest50",
                   "--iters", "1", "--output-dir", str(tmp_path / "out"), env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "resnest50-528c19ca.pth" in line and "pretrained=PATH" in line and "pretrained=none" in line
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
