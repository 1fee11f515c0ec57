"""Shared test fixtures: the real-sample folder and reproducible non-trivial BatchNorm statistics; the skip policy
under CI; running a check as an unprivileged user when the tests run as root."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Tuple

import pytest
import torch

# ../shared beside the repository holds reference key lists and real dataset samples (never copied in here).
SHARED = Path(os.environ.get("SEG_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

# ------------------------------------------------------------------------------------------------ skip policy
# CI counts passes, so a skip there would silently shrink what was checked: under CI=true a skipped test is an
# error (a missing test extra, a missing ../shared, a forgotten skip), unless its reason starts with
# PLATFORM_SKIP, which marks what no installation can fix on that machine (no CUDA, no right to drop root).
PLATFORM_SKIP = "platform:"


def skips_are_errors() -> bool:
    """True under CI (``CI=true``, as CI services set it, or ``CI=1``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _skip_reason(longrepr: Any) -> str:
    """The reason a skip report carries (its longrepr is (path, line, "Skipped: reason"))."""
    message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return message[len("Skipped: "):] if message.startswith("Skipped: ") else message


def _skip_as_error(report) -> None:
    """Under CI, turn a skip ``report`` (a test phase or a collected module) into a failure, unless it is a
    platform skip or an expected failure (which pytest reports as a skip too)."""
    if not (report.skipped and skips_are_errors()) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report.longrepr)
    if reason.startswith(PLATFORM_SKIP):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, which makes a skip an error unless its reason starts with "
                       f"{PLATFORM_SKIP!r} (install the test extras and put ../shared beside the checkout): {reason}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outermost: sees the report after xfail handling
def pytest_runtest_makereport(item, call):
    outcome = yield
    _skip_as_error(outcome.get_result())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips the whole module here
    _skip_as_error(outcome.get_result())


# ---------------------------------------------------------------------------------------- unprivileged checks
NOBODY = 65534  # uid and gid of "nobody"


def _run_as_nobody(send, function: Callable, args: tuple) -> None:
    """The forked child of :func:`call_unprivileged`: drop to nobody, run, send back ("returned"|"raised", value)."""
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    except OSError as error:
        send.send(("cannot drop root", str(error)))
        return
    try:
        send.send(("returned", function(*args)))
    except BaseException as error:  # re-raised in the parent, whatever it is
        send.send(("raised", error))


def call_unprivileged(function: Callable, *args: Any) -> Any:
    """``function(*args)`` with the file permissions a user has; returns its result or raises its exception.

    Root ignores directory permissions, and CI runs as root: there the call runs in a forked child that first drops
    to nobody (no exec: the interpreter under /root stays out of nobody's reach, and what is imported comes along).
    Skips (platform) where root may not change its uid. Paths given must be reachable by nobody
    (:func:`folders_for_nobody`)."""
    if os.geteuid() != 0:
        return function(*args)
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    child = fork.Process(target=_run_as_nobody, args=(send, function, args), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(120):
            raise AssertionError("the unprivileged child sent no result within 120 s")
        kind, value = receive.recv()
    except EOFError:
        raise AssertionError("the unprivileged child died without a result") from None
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    if kind == "cannot drop root":
        pytest.skip(f"{PLATFORM_SKIP} running as root without the right to become nobody: {value}")
    if kind == "raised":
        raise value
    return value


@pytest.fixture
def folders_for_nobody() -> Iterator[Tuple[Path, Path]]:
    """(writable, locked): two folders under a fresh one that any user can reach (pytest's tmp_path is not: its
    root is private to the user running the tests); any user may write into the first, nobody but root into the
    second (mode 0555)."""
    base = Path(tempfile.mkdtemp(prefix="seg-permissions-"))
    try:
        base.chmod(0o755)
        writable, locked = base / "writable", base / "locked"
        writable.mkdir(mode=0o777)
        writable.chmod(0o777)  # past the umask
        locked.mkdir()
        locked.chmod(0o555)
        yield writable, locked
    finally:
        if (base / "locked").exists():
            (base / "locked").chmod(0o755)
        shutil.rmtree(base)


@pytest.fixture
def shared() -> Callable[..., Path]:
    """shared("reference", "x.txt") -> the path under ../shared, skipping the test with the reason if absent."""

    def locate(*parts: str) -> Path:
        path = SHARED.joinpath(*parts)
        if not path.exists():
            pytest.skip(f"{path} is absent (the shared reference folder is not beside this checkout)")
        return path

    return locate


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN affine parameters, running statistics measured on a random batch, eval mode.

    Like a trained network (and unlike random running statistics, which blow logits up to the hundreds where
    fp32 rounding alone exceeds 1e-4), activations stay normalised; residual-branch gammas (``bn3``) are small.
    """
    from discriminating_model import randomize_batchnorm_parameters

    generator = torch.Generator().manual_seed(seed)
    norms = randomize_batchnorm_parameters(model, generator)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64, generator=generator))
    for module in norms:
        module.momentum = 0.1
    return model.eval()


@pytest.fixture
def randomize_batchnorm() -> Callable[..., torch.nn.Module]:
    """Give every BN random affine parameters and data-measured running statistics (returns the model in eval)."""
    return _randomize_batchnorm


# Validation on 4 of the 24 toy images: these runs check that validation happens and is logged, not its score
# (the full toy validation cost about 12 s per run).
TINY_TRAINING = ["--dataset", "toy", "--iters", "8", "--batch-size", "2", "--crop-size", "48", "--base-size", "64",
                 "--workers", "0", "--eval-every", "4", "--val-limit", "4", "--log-every", "1", "--seed", "3"]


@pytest.fixture(scope="session")
def tiny_training_run(tmp_path_factory):
    """A finished 8-iteration toy run (output folder, completed process), shared by the engine and CLI tests."""
    import subprocess
    import sys

    output = tmp_path_factory.mktemp("tiny_run")
    result = subprocess.run([sys.executable, "-m", "seg.train", *TINY_TRAINING, "--output-dir", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return output, result


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def discriminating_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by ``Trainer.save`` whose DeepLabV3-ResNeSt14 gives varied, confident masks that
    depend on colour, intensity scale, position and scale (tests/discriminating_model.py), built in seconds.

    It proves that power on toy val scenes before any test relies on it, so it cannot silently degrade into a
    constant model, against which a channel swap or a missing x255 would go unnoticed."""
    from discriminating_model import discrimination_report, write_discriminating_checkpoint
    from seg.data import build_dataset

    path = write_discriminating_checkpoint(tmp_path_factory.mktemp("discriminating") / "best.pth")
    scenes = build_dataset("toy", "val")
    report = discrimination_report(path, [scenes.load(index)["image"] for index in range(4)])
    assert report["fewest_classes"] >= 3, report
    assert report["confident"] >= 0.8, report
    assert report["changed_by_channel_swap"] >= 0.1, report
    assert report["changed_by_missing_x255"] >= 0.3, report
    assert report["changed_by_mirror"] >= 0.05, report
    assert report["changed_by_half_scale"] >= 0.05, report
    return path
