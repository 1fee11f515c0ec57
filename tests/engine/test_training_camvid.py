"""Training really learns on real data: a short CPU run on the CamVid sample (../shared/data/camvid) lowers the
loss and lifts train-set mIoU far above what predicting the majority class scores."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from seg.data import build_dataset, eval_transforms
from seg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from seg.engine.evaluator import evaluate
from seg.engine.inference import InferenceConfig
from seg.engine.metrics import metrics_from_confusion


def test_short_camvid_run_learns(shared, tmp_path):
    root = shared("data", "camvid")
    output = tmp_path / "camvid"
    result = subprocess.run(
        # The ImageNet-style optimisation (heads 10x, stride 8, fp32) pinned by flags: this checks that training
        # learns at all, not the from-scratch recipe (experiments/README.md measures that).
        [sys.executable, "-m", "seg.train", "--dataset", "camvid", "--data-root", str(root), "--backbone",
         "resnest14", "--pretrained", "none", "--iters", "80", "--batch-size", "8", "--crop-size", "128",
         "--base-size", "240", "--lr", "0.05", "--workers", "2", "--eval-every", "1000", "--val-limit", "1",
         "--log-every", "1", "--class-weights", "none", "--warmup-iters", "0", "--head-lr-mult", "10",
         "--output-stride", "8", "--amp", "off", "--output-dir", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 80
    # Each logged loss is one batch of 8 crops, noisy by +-0.5 around the trend: the bar compares the means of the
    # first 5 and the last 20 steps. (It compared the 5th and 10th steps with the 65th to 80th in steps of 5 before;
    # on an AMD EPYC the 10th batch happened to score 2.30 between neighbours of 3.2-3.4, and the same run that
    # halves the loss by the means here, 3.45 -> 1.53, failed it.)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5]), losses

    train_images = build_dataset("camvid", "train", root=root, transforms=eval_transforms())
    train_images.samples = train_images.samples[::12]  # 31 frames spread over the sequence
    model = model_from_checkpoint(load_checkpoint(output / "last.pth"))
    # At the training scale (long side 240, as the trainer validates): the 480-pixel originals cost 4x as much.
    learned = evaluate(model, train_images, torch.device("cpu"), InferenceConfig(base_size=240), workers=2,
                       progress=False)

    # The baseline: every pixel called the most frequent class.
    counts = np.zeros(11, dtype=np.int64)
    for index in range(len(train_images)):
        mask = train_images.load(index)["mask"]
        counts += np.bincount(mask[mask != 255], minlength=11)
    confusion = np.zeros((11, 11), dtype=np.int64)
    confusion[:, counts.argmax()] = counts
    majority = metrics_from_confusion(confusion)["mIoU"]
    assert learned["mIoU"] > 0.15 and learned["mIoU"] > 3 * majority, (learned["mIoU"], majority)
