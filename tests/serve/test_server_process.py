"""``python -m seg.serve`` as a real process on loopback: it loads the model before it listens, SIGTERM lets the
request in flight finish (and turns /readyz to 503) before the process exits, and usage mistakes are one line
with exit status 2."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED

httpx = pytest.importorskip("httpx", reason="httpx (the test client) is not installed: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[test]'")

CITYSCAPES_TRAIN = SHARED / "data" / "cityscapes" / "leftImg8bit" / "train"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(checkpoint, port: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seg.serve", "--checkpoint", str(checkpoint), "--port",
                             str(port), "--device", "cpu", "--log-level", "warning", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_ready(process: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the service exited ({process.returncode}): {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the service did not become ready")


def test_sigterm_finishes_the_request_in_flight_then_exits(discriminating_checkpoint, tmp_path):
    frames = sorted(CITYSCAPES_TRAIN.rglob("*_leftImg8bit.png"))
    if not frames:
        pytest.skip(f"real samples absent: no Cityscapes frame under {CITYSCAPES_TRAIN} (../shared/data)")
    frame = frames[0]  # 2048 x 1024: ms+flip on it takes seconds on a CPU, long enough to signal during it
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # fp32: bf16 convolutions choose their padding path by timing (seg.models.conv), so two processes can round
    # differently; fp32 convolutions are plain oneDNN ones, the same sums in both.
    process = start_service(discriminating_checkpoint, port, "--queue", "2", "--precision", "fp32")
    try:
        wait_until_ready(process, url)
        answer = {}

        def slow_request():
            answer["response"] = httpx.post(url + "/v1/predict?ms_flip=true", content=frame.read_bytes(),
                                            timeout=300)

        thread = threading.Thread(target=slow_request)
        thread.start()
        deadline = time.monotonic() + 60
        while "seg_predictions_admitted 1" not in httpx.get(url + "/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "the request never reached the model"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        thread.join(300)
        process.wait(60)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    response = answer["response"]
    assert response.status_code == 200, response.text
    # The reference is seg.predict in a fresh process as well: this test process has run hundreds of tests,
    # whose thread settings can change the last bits of a float sum.
    reference = subprocess.run([sys.executable, "-m", "seg.predict", str(frame), "--checkpoint",
                                str(discriminating_checkpoint), "--out", str(tmp_path), "--device", "cpu",
                                "--precision", "fp32", "--ms-flip"], capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = np.asarray(Image.open(tmp_path / f"{frame.stem}.png"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.content))), expected)
    # uvicorn re-raises the signal once drained: the process ends as a SIGTERM'd process does, without a traceback.
    assert process.returncode in (0, -signal.SIGTERM), (process.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    with pytest.raises(httpx.TransportError):  # nothing listens any more
        httpx.get(url + "/healthz", timeout=2)


def test_usage_mistakes_are_one_line_with_exit_status_2(discriminating_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pth")], "--checkpoint"),
        (["--checkpoint", str(empty)], "is empty"),
        (["--checkpoint", str(discriminating_checkpoint), "--port", str(busy.getsockname()[1])], "cannot listen"),
        (["--checkpoint", str(discriminating_checkpoint), "--port", "70000"], "--port"),
        (["--checkpoint", str(discriminating_checkpoint), "--max-batch", "0"], "--max-batch"),
        (["--checkpoint", str(discriminating_checkpoint), "--precision", "fp8"], "--precision"),
        (["--checkpoint", str(discriminating_checkpoint), "--max-upload-mb", "-1"], "--max-upload-mb"),
        (["--checkpoint", str(discriminating_checkpoint), "--batch-wait-ms", "-5"], "--batch-wait-ms"),
    ]
    import uvicorn

    from seg.serve.__main__ import main

    # A mistake that slipped through would serve forever: fail instead.
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: pytest.fail("the service would start"))
    try:
        # One as a real process (the traceback-free exit of the interpreter itself), the rest through main().
        argv, words = cases[2]
        result = subprocess.run([sys.executable, "-m", "seg.serve", *argv], capture_output=True, text=True,
                                timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert result.returncode == 2, (argv, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr, (argv, result.stderr)
        for argv, words in cases:
            capsys.readouterr()
            try:
                status = main(argv)
            except SystemExit as exit:
                status = exit.code
            stderr = capsys.readouterr().err
            assert status == 2, (argv, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and words in lines[0], (argv, stderr)
    finally:
        busy.close()
