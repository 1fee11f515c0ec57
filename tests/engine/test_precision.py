"""Precision: what ``auto`` resolves to, bf16 inference against fp32 (the accuracy guard), the fp32 loss."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import seg.engine.precision as precision
from seg import Segmenter
from seg.data import build_dataset
from seg.engine.inference import model_dtype
from seg.engine.loss import segmentation_loss
from seg.engine.metrics import ConfusionMatrix


@pytest.mark.parametrize("units, expected", [("AMX", torch.bfloat16), ("AVX-512 BF16", torch.bfloat16),
                                             ("", torch.float32)])
def test_auto_is_bf16_only_on_cpus_with_bf16_units(monkeypatch, units, expected):
    monkeypatch.setattr(precision, "cpu_matrix_units", lambda: units)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("fp32", "cpu") == torch.float32
    assert precision.resolve_precision("bf16", "cpu") == torch.bfloat16
    assert precision.resolve_precision("fp16", "cpu") == torch.float16


@pytest.mark.parametrize("units", ["AMX", ""])
def test_autocast_dtype_of_the_amp_setting(monkeypatch, units):
    monkeypatch.setattr(precision, "cpu_matrix_units", lambda: units)
    assert precision.autocast_dtype("off", "cpu") is None
    assert precision.autocast_dtype("auto", "cpu") == (torch.bfloat16 if units else None)  # fp32: no autocast
    assert precision.autocast_dtype("bf16", "cpu") == torch.bfloat16
    assert precision.autocast_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="amp must be one of auto, bf16, fp16, off"):
        precision.autocast_dtype("fp32", "cpu")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        precision.resolve_precision("int8", "cpu")


def test_this_machine_is_described_for_benchmarks():
    described = precision.describe_cpu()
    assert "bf16 units: " in described and described.split("bf16 units: ")[1] in ("AMX", "AVX-512 BF16", "none")


def test_loss_is_float32_for_bf16_logits():
    logits = torch.randn(2, 4, 8, 8).bfloat16()
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, 0] = 255
    loss = segmentation_loss((logits, logits), target, 0.4)
    assert loss.dtype == torch.float32
    expected = 1.4 * torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=255)
    assert torch.allclose(loss, expected)


@pytest.fixture(scope="module")
def trained_toy(tmp_path_factory):
    """A toy model trained until it is confident (most pixels right), so bf16 is judged on a trained network's
    margins, as the guard is meant: an untrained net has pixels with near-equal logits everywhere."""
    output = tmp_path_factory.mktemp("toy_trained")
    done = subprocess.run([sys.executable, "-m", "seg.train", "--dataset", "toy", "--iters", "60", "--batch-size", "4",
                           "--crop-size", "64", "--base-size", "96", "--workers", "0", "--eval-every", "60",
                           "--seed", "1", "--output-dir", str(output)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return output / "best.pth"


def test_bf16_inference_agrees_with_fp32(trained_toy):
    """The accuracy guard on small inputs: >= 99 % of pixels alike and mIoU within 0.3 points, in whole-image
    and in multi-scale + flip inference; probabilities float32 and close."""
    fp32 = Segmenter.from_checkpoint(trained_toy, device="cpu", precision="fp32")
    bf16 = Segmenter.from_checkpoint(trained_toy, device="cpu", precision="bf16")
    assert model_dtype(bf16.model) == torch.bfloat16 and model_dtype(fp32.model) == torch.float32
    dataset = build_dataset("toy", "val")
    for ms_flip in (False, True):
        confusions = {name: ConfusionMatrix(dataset.num_classes) for name in ("fp32", "bf16")}
        agree = total = 0
        for index in range(8):
            sample = dataset.load(index)
            reference = fp32.predict_proba(sample["image"], ms_flip=ms_flip)
            reduced = bf16.predict_proba(sample["image"], ms_flip=ms_flip)
            assert reduced.dtype == np.float32
            assert np.abs(reduced.sum(0) - 1).max() < 1e-5
            assert np.abs(reduced - reference).mean() < 0.01
            agree += int((reduced.argmax(0) == reference.argmax(0)).sum())
            total += reference[0].size
            mask = torch.from_numpy(sample["mask"].astype(np.int64))
            confusions["fp32"].update(torch.from_numpy(reference.argmax(0)), mask)
            confusions["bf16"].update(torch.from_numpy(reduced.argmax(0)), mask)
        miou = {name: c.compute(dataset.classes)["mIoU"] for name, c in confusions.items()}
        assert miou["fp32"] > 0.3, "the fixture model did not learn: the guard would compare noise"
        assert agree / total >= 0.99
        assert abs(miou["bf16"] - miou["fp32"]) <= 0.003


def test_segmenter_precision(trained_toy):
    bf16 = Segmenter.from_checkpoint(trained_toy, device="cpu", precision="bf16")
    assert bf16.precision == "bf16"
    auto = Segmenter.from_checkpoint(trained_toy, device="cpu")
    assert auto.precision == ("bf16" if precision.cpu_matrix_units() else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        Segmenter.from_checkpoint(trained_toy, device="cpu", precision="half")


def test_eval_and_predict_take_the_precision(trained_toy, tmp_path):
    results = {}
    for name in ("fp32", "bf16"):
        json_path = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, "-m", "seg.eval", "--checkpoint", str(trained_toy),
                               "--precision", name, "--workers", "0", "--json", str(json_path)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results[name] = json.loads(json_path.read_text())
        assert results[name]["inference"]["precision"] == name
    assert abs(results["bf16"]["mIoU"] - results["fp32"]["mIoU"]) <= 0.003
    wrong = subprocess.run([sys.executable, "-m", "seg.predict", str(tmp_path), "--checkpoint",
                            str(trained_toy), "--out", str(tmp_path / "masks"), "--precision", "int8"],
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2
    assert len(wrong.stderr.strip().splitlines()) == 1 and "--precision" in wrong.stderr
