"""``python -m seg.export``: ONNX and TorchScript files that match eager PyTorch at another input size.

The exported file is run here, on real images at sizes other than the example's, and its probabilities are
compared with the discriminating fixture model (tests/discriminating_model.py) run as plain eager PyTorch: a
file that merely agrees with its own export-time copy (weights not loaded, batch norm dropped instead of
folded) fails.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from discriminating_model import assert_mask_matches, normalise, reference_model, reference_probabilities
from seg.data import build_dataset

# |exported - eager| in probability: folded batch norm and the runtimes' own kernels; measured differences are up
# to 1.5e-5 (TorchScript and ONNX alike), and a real fault moves probabilities by tenths.
PROBABILITY_TOLERANCE = 1e-4


def run_exported(fmt: str, path, batch: torch.Tensor) -> torch.Tensor:
    """Logits of the exported file on a normalised (N, 3, H, W) batch, with the format's own runtime."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"image": batch.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        with torch.no_grad():
            return torch.jit.load(str(path))(batch)


@pytest.mark.parametrize("fmt,suffix", [("torchscript", "pt"), ("onnx", "onnx")])
def test_export_writes_a_file_that_matches_eager(discriminating_checkpoint, tmp_path, fmt, suffix):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime (export/test extra)")
        pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (export/test extra)")
    out = tmp_path / f"model.{suffix}"
    result = subprocess.run([sys.executable, "-m", "seg.export", "--checkpoint", str(discriminating_checkpoint),
                             "--format", fmt, "--out", str(out), "--size", "64", "80"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and out.stat().st_size > 1_000_000
    line = [text for text in result.stdout.splitlines() if text.startswith("wrote")][-1]
    difference = float(line.split("difference| ")[1].split()[0])
    assert difference <= 1e-3 and line.endswith("ok")

    eager = reference_model(discriminating_checkpoint)
    dataset = build_dataset("toy", "val")
    # Two scenes in one batch (the batch axis is dynamic too), at a size neither square nor the example's.
    images = [dataset.load(i)["image"][:97, :111] for i in (0, 1)]
    logits = run_exported(fmt, out, torch.cat([normalise(image) for image in images]))
    assert logits.shape == (2, len(dataset.classes), 97, 111)
    for index, image in enumerate(images):
        expected = reference_probabilities(eager, image)
        probabilities = logits[index : index + 1].softmax(1)[0].numpy()
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=PROBABILITY_TOLERANCE)
        assert_mask_matches(probabilities.argmax(0), expected, f"{fmt} image {index}")
        assert len(np.unique(probabilities.argmax(0))) >= 3


def test_export_needs_a_real_checkpoint(tmp_path):
    bogus = tmp_path / "bogus.pth"
    bogus.write_text("nope")
    result = subprocess.run([sys.executable, "-m", "seg.export", "--checkpoint", str(bogus), "--format",
                             "torchscript", "--out", str(tmp_path / "m.pt")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "bogus.pth" in result.stderr and "Traceback" not in result.stderr
