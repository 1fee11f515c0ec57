"""``torchrun`` on CPU: two gloo processes train together, validation counts every image exactly once, and a worker
that dies is restarted (``--max-restarts``) and the run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from seg.data import build_dataset, eval_transforms
from seg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from seg.engine.evaluator import evaluate
from seg.engine.inference import InferenceConfig
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
    at_training_scale = InferenceConfig(base_size=payload["config"]["base_size"])  # as validation runs
    single = evaluate(model_from_checkpoint(payload), dataset, torch.device("cpu"), at_training_scale, workers=0,
                      progress=False)
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


def worker_pid(launcher_pid: int, rank: int) -> Optional[int]:
    """The pid of torchrun's worker process of ``rank`` (a child of the launcher with RANK=rank), if started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile, or not ours to read
        if parent == launcher_pid and f"RANK={rank}".encode() in environment:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc (Linux)")
def test_sigterm_reaching_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    """A scheduler's SIGTERM may reach the ranks one at a time, or only one of them. Every rank must still save and
    stop at the same iteration: a rank that went on alone would wait forever in its next collective."""
    output = tmp_path / "terminated"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "seg.train",
         *TWO_PROCESS_TRAINING[:2], "--iters", "400", *TWO_PROCESS_TRAINING[4:], "--eval-every", "1000",
         "--output-dir", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = stop_one_rank_and_wait(launcher, output / "log.jsonl")
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # anything left, workers included: they hold the pipes open
        except ProcessLookupError:
            pass
        launcher.communicate()
    assert "stopped by signal 15 at iteration" in stdout, stderr[-3000:]
    stopped_at = int(stdout.split("stopped by signal 15 at iteration ")[1].split(";")[0])
    assert 2 <= stopped_at < 400
    assert load_checkpoint(output / "last.pth")["iteration"] == stopped_at
    # Rank 1 handled its signal and exited with 128 + SIGTERM (torchrun then ends rank 0, already done).
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*143\b", stderr), stderr[-3000:]


def stop_one_rank_and_wait(launcher: subprocess.Popen, log: Path):
    """Once two iterations are logged, SIGTERM rank 1 alone; return torchrun's (stdout, stderr)."""
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None and (
            not log.exists() or log.read_text().count('"loss"') < 2):
        time.sleep(0.05)
    rank1 = worker_pid(launcher.pid, 1)
    assert rank1 is not None, f"rank 1's worker process was not found (torchrun status {launcher.poll()})"
    os.kill(rank1, signal.SIGTERM)
    try:
        return launcher.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks hung after one of them was signalled")
