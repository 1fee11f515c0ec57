"""``torchrun`` on CPU: two gloo processes train together with synchronised BatchNorm and reach the weights of one
process holding the whole batch, validation counts every image exactly once, and a worker that dies is restarted
(``--max-restarts``) and the run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from seg.data import build_dataset, eval_transforms
from seg.data.base import IGNORE_INDEX
from seg.engine.checkpoint import checkpoint_card, load_checkpoint, model_from_checkpoint
from seg.engine.evaluator import evaluate
from seg.engine.inference import InferenceConfig
from seg.models import build_segmentor

# seg.train whose last rank SIGKILLs itself after the iteration in CRASH_VARIABLE (first attempt only).
CRASH_SCRIPT = str(Path(__file__).resolve().parents[1] / "crash_after_iteration.py")
CRASH_VARIABLE = "SEG_TEST_CRASH_AT_ITERATION"


TWO_PROCESS_TRAINING = ["--dataset", "toy", "--iters", "4", "--batch-size", "2", "--crop-size", "48", "--base-size",
                        "64", "--workers", "0", "--eval-every", "4", "--log-every", "1"]


def torchrun(*args, restarts: int = 0, env=None, program=("-m", "seg.train")) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 --max-restarts=N -m seg.train ARGS`` on the CPU (gloo);
    ``program``: what each process runs instead (a script path)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         f"--max-restarts={restarts}", *program, *args],
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
    # The ratios would be the same if both ranks counted all 7 images; the pixel total would double. It is the
    # 7 masks' labelled pixels, each counted once.
    labelled = sum(int((dataset[index]["mask"] != IGNORE_INDEX).sum()) for index in range(len(dataset)))
    assert logged[0]["pixels"] == single["pixels"] == labelled > 0


# Two processes of 2 images and one of 4 see the same 4 images per step, identically augmented: the sampler deals
# each shuffled epoch out by position (rank r takes positions r, r + 2, ...; one process takes them all) and seeds
# a sample's augmentation from (seed, epoch, position), and every rank starts from the seed's weights. The toy
# recipe's rescale (x0.75-1.5 of base 64) never leaves a 48 crop padded, so every image has as many labelled
# pixels and the mean of the ranks' losses is the loss of the batch of 4.
BATCH_OF_FOUR = ["--dataset", "toy", "--iters", "2", "--crop-size", "48", "--base-size", "64", "--workers", "0",
                 "--val-limit", "1", "--log-every", "1"]

# Dropout draws its masks from each process's own RNG: 2 processes of 2 images cannot draw the masks that 1 process
# of 4 draws, whatever the seeds. The equivalence runs therefore train through this wrapper of seg.train's main(),
# which only sets the dropout probabilities to 0 (the model and everything else is seg.train's) and prints the
# batch norm classes of the model the trainer built.
TRAIN_WITHOUT_DROPOUT = '''\
import sys

from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

import seg.engine.trainer as trainer
from seg.train import main

build_segmentor, run = trainer.build_segmentor, trainer.Trainer.run


def build_without_dropout(*args, **kwargs):
    model = build_segmentor(*args, **kwargs)
    for module in model.modules():
        if isinstance(module, _DropoutNd):
            module.p = 0.0
    return model


def report_batch_norm_and_run(self):
    if self.context.is_main:
        kinds = sorted({type(m).__name__ for m in self.model.modules() if isinstance(m, _BatchNorm)})
        print("batch norm classes:", ", ".join(kinds), flush=True)
    return run(self)


trainer.build_segmentor, trainer.Trainer.run = build_without_dropout, report_batch_norm_and_run
sys.exit(main())
'''


@pytest.fixture(scope="module")
def train_without_dropout(tmp_path_factory) -> Path:
    """TRAIN_WITHOUT_DROPOUT as a script file."""
    script = tmp_path_factory.mktemp("batch_of_four") / "train_without_dropout.py"
    script.write_text(TRAIN_WITHOUT_DROPOUT)
    return script


@pytest.fixture(scope="module")
def one_process_of_four(train_without_dropout, tmp_path_factory):
    """(output folder, result) of 1 process x batch 4, without dropout: what the distributed runs must reach."""
    one = tmp_path_factory.mktemp("one_process")
    return one, subprocess.run([sys.executable, str(train_without_dropout), *BATCH_OF_FOUR, "--batch-size", "4",
                                "--output-dir", str(one)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def batch_of_four_runs(train_without_dropout, one_process_of_four, tmp_path_factory):
    """(output folder, result) of 2 processes x batch 2 under torchrun and of 1 process x batch 4, without dropout."""
    two = tmp_path_factory.mktemp("two_processes")
    two_result = torchrun(*BATCH_OF_FOUR, "--batch-size", "2", "--output-dir", str(two),
                          program=(str(train_without_dropout),))
    return (two, two_result), one_process_of_four


def initial_state(checkpoint: dict) -> dict:
    """The model state the run that wrote ``checkpoint`` started from: its seed's random weights."""
    card = checkpoint_card(checkpoint)
    with torch.random.fork_rng():
        torch.manual_seed(checkpoint["config"]["seed"])
        return build_segmentor(**card.builder_arguments()).state_dict()


# Two float32 runs of the same steps part by the order of their sums (all-reduces, per-rank partial sums), and
# BatchNorm over this toy's small maps (6x6 after the stem) amplifies that: measured with 1 and 2 threads, a
# tensor's difference is at most 2 % of how far training moved it (the median 1e-5 of it; tensors that barely moved
# lie within 3e-8), the running statistics within 3e-6. Without synchronised BatchNorm, rank 0 normalises by its 2
# images alone: the median tensor is then off by 130 % of its update, running means by up to 0.2.
SHARE_OF_THE_UPDATE = 0.1
FLOAT_NOISE = 1e-6


def test_two_processes_of_two_images_train_like_one_process_of_four(batch_of_four_runs):
    """Through seg.train itself: the model under torchrun has synchronised BatchNorm, and two processes x batch 2
    end with the weights and BatchNorm statistics of one process x batch 4 (two steps; test_distributed.py checks
    the arithmetic of one step in float64)."""
    (two, two_result), (one, one_result) = batch_of_four_runs
    assert two_result.returncode == 0, two_result.stderr[-3000:]
    assert one_result.returncode == 0, one_result.stderr[-3000:]
    assert "total batch 4 = 2 x 2 process(es) x 1 accumulation" in two_result.stdout
    assert "total batch 4 = 4 x 1 process(es) x 1 accumulation" in one_result.stdout
    assert "batch norm classes: SyncBatchNorm\n" in two_result.stdout
    assert "batch norm classes: BatchNorm2d\n" in one_result.stdout
    assert_trained_alike(load_checkpoint(two / "last.pth"), load_checkpoint(one / "last.pth"))


def assert_trained_alike(distributed: dict, single: dict) -> None:
    """The checkpoint of a distributed run holds the weights and BatchNorm statistics of ``single``'s one process
    after the same two steps, to float noise (SHARE_OF_THE_UPDATE of how far training moved each tensor)."""
    assert distributed["iteration"] == single["iteration"] == 2
    assert distributed["model"].keys() == single["model"].keys()
    initial = initial_state(single)
    # The bound below is only as tight as this is the runs' start: two steps moved the convolutions by ~3 % (in
    # norm); from another seed's weights they would lie 141 % away.
    convolutions = [key for key, value in single["model"].items() if value.ndim == 4]
    moved = sum(float((single["model"][key] - initial[key]).norm() ** 2) for key in convolutions)
    assert moved < 0.1**2 * sum(float(single["model"][key].norm() ** 2) for key in convolutions)
    compared_statistics = 0
    for key, expected in single["model"].items():
        got = distributed["model"][key]
        if key.endswith("num_batches_tracked"):
            assert torch.equal(got, expected), key
            continue
        update = (expected - initial[key]).abs().max().item()
        difference = (got - expected).abs().max().item()
        assert difference <= FLOAT_NOISE + SHARE_OF_THE_UPDATE * update, (
            f"{key}: the runs differ by {difference:.3g}; training moved it by {update:.3g}")
        compared_statistics += key.endswith("running_var")
    batch_norm_layers = sum(key.endswith("running_var") for key in single["model"])
    assert compared_statistics == batch_norm_layers > 30  # the pooled ones (ASPP image pool, attention gates) too


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (free when probed: the caller binds it soon after)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_nodes(*args, program, folder: Path, nodes: int = 2, timeout: float = 600) -> list:
    """``torchrun --nnodes=N --nproc_per_node=1`` with c10d rendezvous on 127.0.0.1: one launcher per "node",
    started together, as on N machines; each node's (returncode, stdout, stderr). One that has not ended within
    ``timeout`` seconds (a rendezvous that never completes, a hung collective) fails the test, every launcher and
    worker killed."""
    port = free_port()  # the c10d store's, which the first launcher to get there serves
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=seg-test-{os.getpid()}-{port}",
               "--local-addr=127.0.0.1", *program, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one worker per core, as torchrun sets for several per node
    logs = [(folder / f"node{node}.out", folder / f"node{node}.err") for node in range(nodes)]
    launchers = []
    try:
        for out, err in logs:  # files, not pipes: no launcher blocks on a full pipe while another is waited for
            with open(out, "w") as stdout, open(err, "w") as stderr:
                launchers.append(subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env,
                                                  start_new_session=True))
        deadline = time.monotonic() + timeout
        for node, launcher in enumerate(launchers):
            try:
                launcher.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"node {node} of {nodes} had not ended after {timeout:g} s; its stderr ends: "
                            + logs[node][1].read_text()[-2000:])
    finally:
        for launcher in launchers:
            if launcher.poll() is None:  # (a launcher that ended has ended its worker)
                os.killpg(launcher.pid, signal.SIGKILL)  # it and its worker: the session it leads
                launcher.wait()
    return [subprocess.CompletedProcess(command, launcher.returncode, out.read_text(), err.read_text())
            for launcher, (out, err) in zip(launchers, logs)]


def test_torchrun_nnodes_2_of_one_process_each_train_like_one_process_of_four(train_without_dropout,
                                                                             one_process_of_four, tmp_path):
    """Two machines of one process each, on loopback (``--nnodes=2``, c10d rendezvous): rank and local rank now
    differ (both workers are local rank 0, one of them rank 1), and the run still reaches one process x batch 4's
    weights. Both nodes get the same --output-dir; rank 0, on whichever node the rendezvous made it, writes."""
    output = tmp_path / "two_nodes"
    results = torchrun_nodes(*BATCH_OF_FOUR, "--batch-size", "2", "--output-dir", str(output),
                             program=(str(train_without_dropout),), folder=tmp_path)
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node}: " + result.stderr[-3000:]
    stdout = [result.stdout for result in results]
    announced = [text.count("total batch 4 = 2 x 2 process(es) x 1 accumulation") for text in stdout]
    assert sorted(announced) == [0, 1], stdout  # once, by rank 0, on one node
    assert "batch norm classes: SyncBatchNorm\n" in stdout[announced.index(1)]
    one, one_result = one_process_of_four
    assert one_result.returncode == 0, one_result.stderr[-3000:]
    assert_trained_alike(load_checkpoint(output / "last.pth"), load_checkpoint(one / "last.pth"))


def test_a_killed_worker_is_restarted_and_training_continues_from_the_last_checkpoint(two_process_run, tmp_path):
    # The crash script makes rank 1 SIGKILL itself after iteration 2, before that iteration's checkpoint, in the
    # first attempt only; torchrun then restarts both workers, and --resume auto takes them on from iteration 1.
    reference, _ = two_process_run
    output = tmp_path / "restarted"
    env = dict(os.environ, **{CRASH_VARIABLE: "2"})
    result = torchrun(*TWO_PROCESS_TRAINING, "--val-limit", "1", "--checkpoint-every", "1", "--resume", "auto",
                      "--output-dir", str(output), restarts=1, env=env, program=(CRASH_SCRIPT,))
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


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="platform: finds torchrun's workers through /proc (Linux)")
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
    # Both ranks leave through the vote with 128 + SIGTERM. Whichever exits first (rank 1 usually; rank 0 on a
    # loaded machine) is torchrun's first observed failure, and torchrun then ends the other, already past its
    # last collective. A rank killed by the signal itself would be first, with -15.
    assert "Root Cause (first observed failure):" in stderr, stderr[-3000:]
    first_failure = stderr.split("Root Cause (first observed failure):")[1]
    assert re.search(r"rank\s*:\s*[01] \(local_rank: [01]\)\s*exitcode\s*:\s*143\b", first_failure), stderr[-3000:]


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
