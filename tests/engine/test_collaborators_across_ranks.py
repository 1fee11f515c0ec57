"""The trainer's collaborators agree across two CPU processes (gloo), as every rank must stop, report and save at
the same iteration: the loss guard names the earliest bad iteration of any rank on every rank, the skipped-file
report merges and dedupes what each rank met, and a SIGTERM that reaches one rank only is agreed by both."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seg.engine.errors import TrainingError
from seg.engine.loss_guard import LossGuard
from seg.engine.skipped_files import SkippedFiles
from seg.engine.stop_signals import StopSignals

BAD_ITERATION = {0: 7, 1: 5}  # rank 1 goes bad first
MET = {0: ["a.png: truncated", "b.png: truncated"], 1: ["b.png: truncated", "c.png: truncated"]}


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    results = {}

    guard = LossGuard(world_size, out_dir)
    for iteration in range(1, 9):
        guard.note(torch.tensor(float("inf") if iteration == BAD_ITERATION[rank] else 1.0), iteration)
    try:
        guard.check()
        results["guard"] = None
    except TrainingError as error:
        results["guard"] = str(error)

    records = []
    skipped = SkippedFiles(enabled=True, world_size=world_size, is_main=rank == 0, log=records.append)
    skipped.met(MET[rank])
    skipped.report(iteration=3)
    results["reported"], results["records"] = skipped.reported, records

    stops = StopSignals(world_size)
    with stops:
        before = stops.agreed()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        results["stop"] = [before, stops.agreed()]
        stops.wait_for_all()

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)], out


def test_every_rank_stops_at_the_earliest_bad_iteration_of_any(ranks):
    (rank0, rank1), out = ranks
    kept = f"stopped without saving (the last good checkpoint in {out} is intact); try a lower lr or amp off"
    assert rank1["guard"] == f"the loss became inf at iteration 5; {kept}"
    assert rank0["guard"] == f"the loss became nan at iteration 5; {kept}"  # rank 0 did not see that loss itself


def test_skipped_files_are_merged_across_ranks_and_reported_once(ranks):
    (rank0, rank1), _ = ranks
    everything = ["a.png: truncated", "b.png: truncated", "c.png: truncated"]
    assert rank0["reported"] == rank1["reported"] == everything  # every rank's checkpoint copy agrees
    assert [r["skipped_file"] for r in rank0["records"]] == everything
    assert [r["skipped_files"] for r in rank0["records"]] == [1, 2, 3]


def test_a_signal_reaching_one_rank_is_agreed_by_both(ranks):
    (rank0, rank1), _ = ranks
    assert rank0["stop"] == rank1["stop"] == [None, int(signal.SIGTERM)]
