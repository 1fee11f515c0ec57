"""``python -m seg.demo``: the Quick-start job writes its images, and user mistakes end in one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from seg import demo


def test_demo_segments_the_synthetic_image(tmp_path, capsys):
    assert demo.main(["--backbone", "resnest14", "--size", "64", "96", "--output-dir", str(tmp_path)]) == 0
    image = np.asarray(Image.open(tmp_path / "input.png"))
    prediction = np.asarray(Image.open(tmp_path / "prediction.png"))
    assert image.shape == prediction.shape == (64, 96, 3)
    out = capsys.readouterr().out
    assert "DeepLabV3-resnest14" in out and "logits (1, 150, 64, 96)" in out


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "seg.demo", *args], capture_output=True, text=True, timeout=120)


def test_unknown_backbone_is_one_line_and_exit_2():
    result = run_demo("--backbone", "resnest51")
    assert result.returncode == 2
    assert "--backbone 'resnest51' is unknown; choose one of: resnest14" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_weights_file_is_one_line_and_exit_2(tmp_path):
    result = run_demo("--backbone", "resnest14", "--pretrained-backbone", str(tmp_path / "missing.pth"))
    assert result.returncode == 2
    expected = f"error: --pretrained-backbone: weights file {tmp_path / 'missing.pth'} does not exist"
    assert result.stderr.strip() == expected
