"""``python -m seg.export``: ONNX and TorchScript files that match eager PyTorch at another input size."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("fmt,suffix", [("torchscript", "pt"), ("onnx", "onnx")])
def test_export_writes_a_file_that_matches_eager(tiny_training_run, tmp_path, fmt, suffix):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime (export/test extra)")
        pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (export/test extra)")
    output, _ = tiny_training_run
    out = tmp_path / f"model.{suffix}"
    result = subprocess.run([sys.executable, "-m", "seg.export", "--checkpoint", str(output / "best.pth"),
                             "--format", fmt, "--out", str(out), "--size", "64", "80"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and out.stat().st_size > 1_000_000
    line = [text for text in result.stdout.splitlines() if text.startswith("wrote")][-1]
    difference = float(line.split("difference| ")[1].split()[0])
    assert difference <= 1e-3 and line.endswith("ok")


def test_export_needs_a_real_checkpoint(tmp_path):
    bogus = tmp_path / "bogus.pth"
    bogus.write_text("nope")
    result = subprocess.run([sys.executable, "-m", "seg.export", "--checkpoint", str(bogus), "--format",
                             "torchscript", "--out", str(tmp_path / "m.pt")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "bogus.pth" in result.stderr and "Traceback" not in result.stderr
