"""``torchrun --nproc_per_node=N -m seg.predict``: the inputs are shared out across the processes, each predicted
once, with the masks of one process; rank 0 reports every rank's outcome in one summary, and the exit status
(1 if any rank failed an input, 2 for a usage mistake) is every rank's.

The comparison runs under ``torchrun`` itself. The exit-status cases start the two ranks directly, with the
environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): torchrun ends the
other workers as soon as one exits with a failure, so only this way is each rank's own status and output seen.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch
from PIL import Image

import seg.predict
from seg.data import build_dataset
from seg.engine.distributed import shard

OPTIONS = ["--device", "cpu", "--precision", "fp32"]


def toy_scenes(folder: Path, names) -> List[Path]:
    """Toy val scenes 0, 1, ... saved as PNG (lossless) under ``folder`` with ``names``."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = build_dataset("toy", "val")
    paths = []
    for index, name in enumerate(names):
        Image.fromarray(scenes.load(index)["image"]).save(folder / name)
        paths.append(folder / name)
    return paths


def predict_in_one_process(*args: str) -> int:
    """``python -m seg.predict ARGS`` in this process, on one thread like each torchrun worker
    (OMP_NUM_THREADS=1): masks byte for byte the same need the same float sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return seg.predict.main([*args, *OPTIONS])
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(*args: str, world_size: int = 2, timeout: float = 120) -> List[subprocess.CompletedProcess]:
    """``python -m seg.predict ARGS`` as ``world_size`` ranks of one process group, started as torchrun starts
    its workers; each rank's (returncode, stdout, stderr). A rank still running after ``timeout`` seconds (a
    hang) fails the test, every rank killed."""
    port = free_port()
    processes = [
        subprocess.Popen([sys.executable, "-m", "seg.predict", *args, *OPTIONS], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                                  LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                  OMP_NUM_THREADS="1"))
        for rank in range(world_size)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for rank, process in enumerate(processes):
            try:
                stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} of {world_size} was still running after {timeout:g} s (a hang)")
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


@pytest.mark.parametrize("length", [0, 1, 2, 5, 6, 7])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_partition_the_list_in_order(length, world_size):
    items = [f"image{index}.png" for index in range(length)]
    shares = [shard(items, rank, world_size) for rank in range(world_size)]
    assert sorted(sum(shares, [])) == sorted(items)  # every item in some share, none in two
    assert all(share == items[rank::world_size] for rank, share in enumerate(shares))  # r, r + W, r + 2W, ...
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shard(items, 0, 1) == items
    with pytest.raises(ValueError):
        shard(items, world_size, world_size)


def test_two_torchrun_processes_predict_each_image_once_like_one_process(discriminating_checkpoint, shared, tmp_path):
    """Five images (three toy scenes, a CamVid and a Cityscapes frame) over two processes: 3 + 2."""
    inputs = tmp_path / "in"
    toy_scenes(inputs, ["scene0.png", "scene1.png", "scene2.png"])
    for source in (shared("data", "camvid", "val", "0016E5_07959.png"),
                   shared("data", "cityscapes", "leftImg8bit", "val", "frankfurt",
                          "frankfurt_000000_000294_leftImg8bit.png")):
        (inputs / source.name).write_bytes(source.read_bytes())
    common = [str(inputs), "--checkpoint", str(discriminating_checkpoint)]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--tee=3", "-m", "seg.predict", *common, "--out", str(tmp_path / "two"), *OPTIONS],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # One summary, by rank 0, counting both ranks' masks: were both ranks to predict every image, it would say 10.
    assert result.stdout.count("wrote ") == 1, result.stdout
    assert f"[default0]:wrote 5 mask(s) to {tmp_path / 'two'}\n" in result.stdout, result.stdout
    assert "[default1]:predict" not in result.stderr  # the progress bar is rank 0's alone
    assert "[default0]:predict (rank 0's 3 of 5)" in result.stderr

    assert predict_in_one_process(*common, "--out", str(tmp_path / "one")) == 0
    names = sorted(path.name for path in (tmp_path / "one").iterdir())
    assert len(names) == 5
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == names
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_an_unreadable_input_on_one_rank_fails_every_rank_and_rank_0_reports_it(discriminating_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    toy_scenes(inputs, ["a.png", "c.png"])
    (inputs / "b.png").write_bytes(b"not an image")  # sorted second: rank 1's, its only input
    absent = tmp_path / "absent.png"  # a missing argument: reported once, not once per rank
    common = [str(inputs), str(absent), "--checkpoint", str(discriminating_checkpoint)]
    rank0, rank1 = run_ranks(*common, "--out", str(tmp_path / "two"))
    assert (rank0.returncode, rank1.returncode) == (1, 1), rank0.stderr[-2000:] + rank1.stderr[-2000:]
    assert rank0.stdout == f"wrote 2 mask(s) to {tmp_path / 'two'}; 2 input(s) failed:\n"
    assert rank0.stderr.endswith(f"  {absent}: no such file or folder\n  {inputs / 'b.png'}: not a readable image "
                                 "(truncated or corrupt, or an unsupported format)\n"), rank0.stderr
    assert rank1.stdout == ""  # no summary of its own
    assert f"skipped {inputs / 'b.png'}" in rank1.stderr and "absent" not in rank1.stderr
    assert "Traceback" not in rank0.stderr + rank1.stderr

    assert predict_in_one_process(*common, "--out", str(tmp_path / "one")) == 1
    names = sorted(path.name for path in (tmp_path / "one").iterdir())
    assert names == ["a.png", "c.png"]
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == names
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_a_usage_mistake_ends_every_rank_with_one_line_and_status_2(discriminating_checkpoint, tmp_path):
    first, second = toy_scenes(tmp_path / "first", ["x.png"])[0], toy_scenes(tmp_path / "second", ["x.png"])[0]
    results = run_ranks(str(tmp_path / "first"), str(tmp_path / "second"), "--checkpoint",
                        str(discriminating_checkpoint), "--out", str(tmp_path / "out"), timeout=60)
    message = (f"python -m seg.predict: error: --out: {first} and {second} would both write x.png into "
               f"{tmp_path / 'out'}; predict them in separate runs or rename one (see --help)\n")
    for rank, result in enumerate(results):
        assert (result.returncode, result.stdout, result.stderr) == (2, "", message), rank
    assert not (tmp_path / "out").exists()
