"""Checkpoint files under faults: a kill in the middle of a save, damaged files, a full disk, an unwritable folder.

The kill test really SIGKILLs a process that is writing checkpoints (forked from this one, so no second torch
import per kill) at random moments, then loads what is on disk.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAINING as TINY
from conftest import call_unprivileged

from seg.engine.checkpoint import CheckpointError, load_checkpoint, remove_partial_checkpoints, save_checkpoint
from seg.train import main as train_main

GENERATION_SIZE = 8 * 2**20  # float32 values per checkpoint (32 MiB): long enough to write that kills land mid-save


def generation_payload(values: np.ndarray, generation: int) -> dict:
    """A checkpoint whose every value is ``generation``: any mix of two saves, or a partial one, is detectable."""
    values.fill(generation)  # numpy, not torch: no OpenMP threads in a forked child
    return {"generation": generation, "weights": torch.from_numpy(values)}


def assert_consistent(payload: dict) -> int:
    generation = payload["generation"]
    weights = payload["weights"]
    assert weights.numel() == GENERATION_SIZE
    assert bool((weights == generation).all()), f"checkpoint of generation {generation} holds other values"
    return generation


def save_generations_forever(path: Path, first: int, completed) -> None:
    """The victim: saves generation after generation to ``path``, publishing each one once it is on disk."""
    values = np.empty(GENERATION_SIZE, dtype=np.float32)
    generation = first
    while True:
        save_checkpoint(generation_payload(values, generation), path)
        completed.value = generation
        generation += 1


def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint(generation_payload(np.empty(GENERATION_SIZE, np.float32), 0), path)
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    last_completed, partial_files_seen = 0, 0
    for round_ in range(1, 11):
        completed = fork.Value("q", -1, lock=False)  # no lock: the child dies at arbitrary points
        victim = fork.Process(target=save_generations_forever, args=(path, 1000 * round_, completed), daemon=True)
        victim.start()
        try:
            deadline = time.monotonic() + 60
            while completed.value < 0 and time.monotonic() < deadline:  # at least one save in this round
                time.sleep(0.005)
            assert completed.value >= 0, "the victim never finished a save"
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            os.kill(victim.pid, signal.SIGKILL)
            victim.join()
        assert victim.exitcode == -signal.SIGKILL
        last_completed = completed.value

        # The checkpoint on disk is whole and at least as new as the last save that returned.
        assert assert_consistent(load_checkpoint(path)) >= last_completed

        # A save killed before its rename leaves a temporary file: never a good checkpoint unless it is complete.
        leftovers = list(tmp_path.glob(".last.pth.*.tmp"))
        assert len(leftovers) <= 1
        for leftover in leftovers:
            partial_files_seen += 1
            try:
                assert assert_consistent(load_checkpoint(leftover)) > last_completed
            except CheckpointError as error:
                assert leftover.name in str(error)
    assert partial_files_seen >= 3, "too few kills landed inside a save to test anything"

    # The next save removes what the killed ones left.
    save_checkpoint(generation_payload(np.empty(GENERATION_SIZE, np.float32), 99_999), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    generator = torch.Generator().manual_seed(0)
    payload = {"model": {"conv.weight": torch.randn(64, 64, 3, 3, generator=generator), "bn.bias": torch.zeros(64)},
               "iteration": 7}
    return save_checkpoint(payload, tmp_path / "last.pth")


def test_truncated_checkpoints_are_refused(small_checkpoint):
    data = small_checkpoint.read_bytes()
    rng = random.Random(1)
    for cut in [len(data) - 1, len(data) // 2, 100] + rng.sample(range(1, len(data)), 20):
        damaged = small_checkpoint.with_name(f"cut-{cut}.pth")
        damaged.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"{damaged.name} is damaged"):
            load_checkpoint(damaged)


def test_a_flipped_byte_is_caught_by_the_crc_check_that_torch_skips(small_checkpoint):
    data = small_checkpoint.read_bytes()
    first_weights = torch.load(small_checkpoint, weights_only=True)["model"]["conv.weight"].flatten()[:4]
    offset = data.index(first_weights.numpy().tobytes())  # where conv.weight's values are stored
    damaged = bytearray(data)
    damaged[offset + 2] ^= 0x40
    corrupt = small_checkpoint.with_name("flipped.pth")
    corrupt.write_bytes(bytes(damaged))
    # The control: torch alone loads the damaged weights without complaint.
    silently_wrong = torch.load(corrupt, weights_only=True)["model"]["conv.weight"]
    assert not torch.equal(silently_wrong, load_checkpoint(small_checkpoint)["model"]["conv.weight"])
    with pytest.raises(CheckpointError, match="flipped.pth is damaged .*CRC-32"):
        load_checkpoint(corrupt)


class FillingDisk:
    """Files that together accept ``capacity`` more bytes, then fail with ``code``; the first ``files_spared`` files
    opened are written in full (checkpoints a run saved before the disk filled up)."""

    def __init__(self, capacity: int, code: int = errno.ENOSPC, files_spared: int = 0) -> None:
        self.capacity = capacity
        self.code = code
        self.files_spared = files_spared

    def wrap(self, handle):
        if self.files_spared > 0:
            self.files_spared -= 1
            return handle
        disk = self

        class Filling:
            def __getattr__(self, name):
                return getattr(handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, data) -> int:
                allowed = min(len(data), disk.capacity)
                handle.write(bytes(memoryview(data)[:allowed]))  # what fits reaches the disk, as on a real one
                disk.capacity -= allowed
                if allowed < len(data):
                    raise OSError(disk.code, os.strerror(disk.code))
                return allowed

        return Filling()


@pytest.fixture
def disk_with(monkeypatch):
    """disk_with(capacity, files_spared=0) -> files opened by save_checkpoint from now on fill up as FillingDisk."""

    def install(capacity: int, code: int = errno.ENOSPC, files_spared: int = 0) -> FillingDisk:
        disk = FillingDisk(capacity, code, files_spared)
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: disk.wrap(real_fdopen(fd, *args, **kwargs)))
        return disk

    return install


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_partial_file(small_checkpoint, disk_with):
    folder = small_checkpoint.parent
    disk = disk_with(capacity=50_000)
    with pytest.raises(CheckpointError) as raised:
        save_checkpoint({"iteration": 8, "model": {"w": torch.zeros(100_000)}}, small_checkpoint)
    message = str(raised.value)
    assert disk.capacity == 0, "the write never reached the simulated full disk"
    assert message == f"cannot write checkpoint {small_checkpoint}: No space left on device; the previous " \
                      f"last.pth is unchanged"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pth"]
    assert load_checkpoint(small_checkpoint)["iteration"] == 7


def test_a_read_only_filesystem_is_reported_with_the_file(small_checkpoint, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {small_checkpoint}: Read-only file system"):
        save_checkpoint({"iteration": 8}, small_checkpoint)
    assert load_checkpoint(small_checkpoint)["iteration"] == 7


def test_a_folder_that_is_a_file_or_read_only_is_reported(tmp_path, folders_for_nobody):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {blocker / 'last.pth'}: "):
        save_checkpoint({"iteration": 1}, blocker / "last.pth")
    # As a user (root ignores directory permissions): the control saves where that user may write.
    writable, locked = folders_for_nobody
    assert call_unprivileged(save_checkpoint, {"iteration": 1}, writable / "last.pth") == writable / "last.pth"
    assert load_checkpoint(writable / "last.pth")["iteration"] == 1
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {locked / 'last.pth'}: Permission denied$"):
        call_unprivileged(save_checkpoint, {"iteration": 1}, locked / "last.pth")
    assert list(locked.iterdir()) == []


def test_partial_files_are_removed_and_never_loaded_as_checkpoints(small_checkpoint):
    folder = small_checkpoint.parent
    partial = folder / ".last.pth.killed.tmp"
    partial.write_bytes(small_checkpoint.read_bytes()[:1000])
    other = folder / ".best.pth.killed.tmp"
    other.write_bytes(b"PK\x03\x04")
    keep = folder / "notes.tmp"
    keep.write_text("not ours")
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(partial)
    save_checkpoint({"iteration": 8}, small_checkpoint)  # a save removes the leftovers of its own file
    assert not partial.exists() and other.exists()
    remove_partial_checkpoints(folder)  # what a (resumed) run does at its start
    assert sorted(p.name for p in folder.iterdir()) == ["last.pth", "notes.tmp"]


def test_a_full_disk_during_training_stops_with_one_line_naming_the_file(tmp_path, disk_with, capsys):
    # In this process, so the simulated disk is the one the trainer writes to. One iteration: validation saves
    # best.pth (spared), then last.pth meets the full disk.
    output = tmp_path / "run"
    disk_with(capacity=1_000_000, files_spared=1)
    status = train_main([*TINY, "--iters", "1", "--val-limit", "1", "--output-dir", str(output)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert error == f"error: cannot write checkpoint {output / 'last.pth'}: No space left on device"
    assert not list(output.glob(".*.tmp")) and not (output / "last.pth").exists()
    assert load_checkpoint(output / "best.pth")["iteration"] == 1


# ------------------------------------------------------------------------------------- the training schema


def small_training_state(seed: int):
    """A tiny model with its optimiser, schedule and scaler, after ``seed``-dependent steps (momentum buffers and
    a moved schedule, so a restore that dropped anything would show)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(seed):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler, scaler


def test_a_training_checkpoint_holds_the_card_and_restores_the_exact_state(tmp_path):
    from seg.card import CardMetrics, ModelCard
    from seg.engine.checkpoint import (TRAINING_STATE_KEYS, checkpoint_card, every_rank_rng_state,
                                       restore_training_checkpoint, scheduled_iterations, training_checkpoint)

    card = ModelCard(segmentor="deeplabv3", backbone="resnest14", num_classes=2, classes=["background", "disc"],
                     palette=[(0, 0, 0), (255, 0, 0)], dataset="toy", base_size=64, crop_size=48)
    card = card.with_metrics(CardMetrics(dataset="toy", split="val", mIoU=0.5, pixAcc=0.75, iteration=3))
    model, optimizer, scheduler, scaler = small_training_state(seed=3)
    history = {"loss": [(1, 2.0), (2, 1.5)], "lr": [(1, 0.1), (2, 0.05)], "val mIoU": [(2, 0.5)]}
    payload = training_checkpoint(card=card, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                  iteration=3, rng=every_rank_rng_state(1), best_miou=0.5,
                                  skipped_files=["b.png: truncated"], history=history,
                                  config={"iters": 10, "seed": 3})
    save_checkpoint(payload, tmp_path / "last.pth")
    expected_draws = torch.rand(5)  # what the run would draw next

    loaded = load_checkpoint(tmp_path / "last.pth")
    assert set(loaded) == {"format", "card", *TRAINING_STATE_KEYS}  # no loose model_config/classes/palette keys
    assert checkpoint_card(loaded) == card
    assert scheduled_iterations(loaded) == 10

    torch.rand(7)  # the restoring process's RNG is elsewhere
    fresh = small_training_state(seed=1)
    progress = restore_training_checkpoint(loaded, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2],
                                           scaler=fresh[3], rank=0, world_size=1)
    assert torch.equal(torch.rand(5), expected_draws)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh[0].state_dict()[key], value), key
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(fresh[1].state[p]["momentum_buffer"], b) for p, b in zip(fresh[0].parameters(), buffers))
    assert fresh[2].state_dict() == scheduler.state_dict()
    assert (progress.iteration, progress.best_miou, progress.skipped_files) == (3, 0.5, ["b.png: truncated"])
    assert progress.history == history and progress.metrics == card.metrics


def test_rng_states_of_another_world_size_are_left_alone(tmp_path):
    from seg.card import ModelCard
    from seg.engine.checkpoint import restore_training_checkpoint, rng_state, training_checkpoint

    card = ModelCard(segmentor="deeplabv3", backbone="resnest14", num_classes=1, classes=["thing"],
                     palette=[(1, 2, 3)])
    model, optimizer, scheduler, scaler = small_training_state(seed=0)
    payload = training_checkpoint(card=card, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                  iteration=0, rng=[rng_state(), rng_state()], best_miou=-1.0, skipped_files=[],
                                  history={"loss": []}, config={"iters": 1})
    torch.rand(3)  # away from the saved states
    state = torch.get_rng_state()
    progress = restore_training_checkpoint(payload, model=model, optimizer=optimizer, scheduler=scheduler,
                                           scaler=scaler, rank=0, world_size=1)  # two ranks saved, one resumes
    assert torch.equal(torch.get_rng_state(), state)
    assert progress.metrics == () and progress.iteration == 0
