"""``python -m seg.train`` under faults, with real processes: SIGKILL at random moments then ``--resume auto``, an
unwritable output folder, corrupt images met during training. (A full disk: test_checkpoint.py; a worker killed
under ``torchrun``: test_torchrun.py.)"""

from __future__ import annotations

import json
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING as TINY
from conftest import call_unprivileged
from PIL import Image
from test_training import logged_iterations, train

from seg.config import build_config
from seg.data import DataError, build_dataset, train_transforms
from seg.data.loader import build_dataloader
from seg.data.toy import CLASSES, toy_scene
from seg.engine.checkpoint import CheckpointError, ensure_writable_directory, load_checkpoint
from seg.train import parser

# A short run that saves every iteration and validates twice, on one image (validation dominates TINY's time).
ITERATIONS = 5
SHORT = [*TINY, "--iters", str(ITERATIONS), "--eval-every", "3", "--val-limit", "1", "--checkpoint-every", "1"]
KILLS_PER_RUN = 2


def log_records(output: Path):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    result = train(*SHORT, "--output-dir", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    return output


def seconds_per_step(output: Path) -> float:
    """The median duration of one training step of a finished run, from its logged throughput (batch 2)."""
    return 2 / statistics.median(r["images_per_s"] for r in log_records(output) if "images_per_s" in r)


def run_until_killed(output: Path, after_iteration: int, delay: float) -> None:
    """Start (or resume) the short run and SIGKILL it ``delay`` seconds after it logs ``after_iteration``."""
    logged_before = len(logged_iterations(output))
    process = subprocess.Popen([sys.executable, "-m", "seg.train", *SHORT, "--output-dir", str(output),
                                "--resume", "auto"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while max(logged_iterations(output)[logged_before:], default=0) < after_iteration:
            assert process.poll() is None, f"the run ended (status {process.returncode}) before being killed"
            assert time.monotonic() < deadline, f"iteration {after_iteration} never came"
            time.sleep(0.02)
        time.sleep(delay)
        assert process.poll() is None, f"the run ended before the kill {delay:.2f}s after {after_iteration}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_moments_then_resume_ends_with_identical_weights(reference_run, tmp_path, seed):
    # Kill points: random iterations, and a random moment within the next step (often inside the checkpoint
    # write that follows every iteration, or inside a validation).
    rng = random.Random(seed)
    step = seconds_per_step(reference_run)
    output = tmp_path / "killed"
    kill_points = [(iteration, rng.uniform(0, step))
                   for iteration in sorted(rng.sample(range(1, ITERATIONS - 1), KILLS_PER_RUN))]
    for iteration, delay in kill_points:
        run_until_killed(output, iteration, delay)
    resumed = train(*SHORT, "--output-dir", str(output), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at iteration" in resumed.stdout
    final, expected = load_checkpoint(output / "last.pth"), load_checkpoint(reference_run / "last.pth")
    assert final["iteration"] == expected["iteration"] == ITERATIONS
    assert final["best_miou"] == expected["best_miou"]
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), f"{key} differs after kills at {kill_points}"
    assert not list(output.glob(".*.tmp")), "a killed save's temporary file was left behind"


# ------------------------------------------------------------------------------------------- output folder


def test_an_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    started = time.monotonic()
    result = train(*TINY, "--output-dir", str(blocker / "run"), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: output_dir {blocker / 'run'} is not writable: Not a directory"
    assert "training DeepLabV3" not in result.stdout
    assert time.monotonic() - started < 60  # seconds, not a training run's worth of time


def test_output_dir_checks_name_the_flag(tmp_path, folders_for_nobody):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match=f"--output-dir {blocker} is a file, not a directory"):
        ensure_writable_directory(blocker, label="--output-dir")
    # As a user (root ignores directory permissions): the control passes where that user may write; the locked
    # folder fails both as a folder to create inside it and as an existing one (found by writing a probe file).
    writable, locked = folders_for_nobody
    call_unprivileged(ensure_writable_directory, writable / "run", "--output-dir")
    assert (writable / "run").is_dir() and list((writable / "run").iterdir()) == []
    for unwritable in (locked / "run", locked):
        with pytest.raises(CheckpointError, match=f"--output-dir {unwritable} is not writable: Permission denied$"):
            call_unprivileged(ensure_writable_directory, unwritable, "--output-dir")
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------------------------------- corrupt images


@pytest.fixture(scope="module")
def folder_with_a_truncated_image(tmp_path_factory):
    """A ``folder`` dataset of 2 train and 1 val toy scenes as PNG files, one train image cut in half."""
    root = tmp_path_factory.mktemp("folder")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, names in (("train", ["a", "b"]), ("val", ["v"])):
        for kind in ("images", "masks"):
            (root / kind / split).mkdir(parents=True)
        for seed, name in enumerate(names):
            image, mask = toy_scene(64, 64, seed=seed)
            Image.fromarray(image).save(root / "images" / split / f"{name}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{name}.png")
    bad = root / "images" / "train" / "b.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return root, bad


def folder_training(root: Path, output: Path, *extra: str):
    # One step an epoch (2 images, batch 2): every step meets the bad image.
    return train("--dataset", "folder", "--data-root", str(root), "--backbone", "resnest14", "--pretrained", "none",
                 "--batch-size", "2", "--crop-size", "48",
                 "--base-size", "64", "--workers", "1", "--val-limit", "1", "--log-every", "1",
                 "--output-dir", str(output), *extra)


def test_a_corrupt_image_stops_the_run_with_its_name(folder_with_a_truncated_image, tmp_path):
    root, bad = folder_with_a_truncated_image
    result = folder_training(root, tmp_path / "out", "--iters", "1")
    assert result.returncode == 2, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {bad}: ") and "truncated" in last_line  # raised in a DataLoader worker
    assert "Traceback" not in result.stderr and "worker" not in result.stderr


def test_skip_bad_samples_logs_the_file_once_counts_it_and_finishes(folder_with_a_truncated_image, tmp_path):
    root, bad = folder_with_a_truncated_image
    output = tmp_path / "out"
    result = folder_training(root, output, "--iters", "2", "--eval-every", "2", "--skip-bad-samples")  # met twice
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "skipped an unreadable training sample" in line]
    assert len(warnings) == 1 and str(bad) in warnings[0]
    skipped = [r for r in log_records(output) if "skipped_file" in r]
    assert len(skipped) == 1 and str(bad) in skipped[0]["skipped_file"] and skipped[0]["skipped_files"] == 1
    assert "skipped 1 unreadable training file(s)" in result.stdout
    checkpoint = load_checkpoint(output / "last.pth")
    assert checkpoint["iteration"] == 2 and checkpoint["skipped_files"] == [skipped[0]["skipped_file"]]


def folder_batches(root: Path, workers: int, skip_bad_samples: bool):
    """The folder dataset, its epoch-0 (index, augmentation seed) order, and that epoch's batches."""
    dataset = build_dataset("folder", "train", root=root, transforms=train_transforms(crop_size=48, base_size=64))
    loader = build_dataloader(dataset, batch_size=2, train=True, workers=workers, seed=5,
                              skip_bad_samples=skip_bad_samples)
    loader.sampler.set_epoch(0)
    return dataset, list(loader.sampler), list(loader)


def test_a_bad_sample_is_replaced_deterministically_whatever_the_workers(folder_with_a_truncated_image):
    root, bad = folder_with_a_truncated_image
    dataset, order, serial = folder_batches(root, workers=0, skip_bad_samples=True)
    _, _, parallel = folder_batches(root, workers=2, skip_bad_samples=True)
    for batch_a, batch_b in zip(serial, parallel, strict=True):
        assert torch.equal(batch_a["image"], batch_b["image"]) and torch.equal(batch_a["mask"], batch_b["mask"])
        assert batch_a["skipped"] == batch_b["skipped"]
    skipped = [message for batch in serial for message in batch["skipped"]]
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}: ")
    # The stand-in is the next file in dataset order (a.png, wrapping around) augmented with the bad one's seed: a
    # pure function of the sampler's output, so a resumed run sees the same batch.
    paths = [str(sample.image) for sample in dataset.samples]
    position = [index for index, _ in order].index(paths.index(str(bad)))
    stand_in = dataset[(paths.index(str(bad.with_name("a.png"))), order[position][1])]
    batch, row = divmod(position, 2)
    assert serial[batch]["path"][row] == str(bad.with_name("a.png"))
    assert torch.equal(serial[batch]["image"][row], stand_in["image"])


def test_without_skipping_the_worker_error_arrives_as_one_line(folder_with_a_truncated_image):
    root, bad = folder_with_a_truncated_image
    try:
        folder_batches(root, workers=2, skip_bad_samples=False)
    except DataError as error:  # not pytest.raises: kept alive, its loader's workers would linger into later tests
        message = str(error)
    else:
        pytest.fail("the truncated image went unnoticed")
    assert message.startswith(f"{bad}: ") and "\n" not in message


def test_skip_bad_samples_comes_through_the_one_config_path(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("skip_bad_samples = true\n")
    assert build_config({}).skip_bad_samples is False
    assert build_config({}, config).skip_bad_samples is True
    flags = {k: v for k, v in vars(parser().parse_args(["--skip-bad-samples"])).items() if k != "config"}
    assert build_config(flags).skip_bad_samples is True
    absent = {k: v for k, v in vars(parser().parse_args([])).items() if k != "config"}
    assert build_config(absent, config).skip_bad_samples is True  # an absent flag leaves the file's value
