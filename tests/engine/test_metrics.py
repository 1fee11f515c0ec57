"""Metrics from the confusion matrix, against a hand-built reference and the stated conventions."""

from __future__ import annotations

import numpy as np
import torch

from seg.engine.metrics import ConfusionMatrix, format_metrics_table


def reference_metrics(prediction, target, num_classes):
    """Straight from the definitions, pixel by pixel."""
    valid = target != 255
    p, t = prediction[valid], target[valid]
    ious = []
    for c in range(num_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union if union else np.nan)
    return {"pixAcc": np.mean(p == t), "IoU": np.array(ious)}


def test_confusion_metrics_match_the_definitions():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (3, 20, 30))
    target[:, :2] = 255
    target[target == 3] = 2  # class 3 never in the ground truth...
    prediction = rng.integers(0, 4, (3, 20, 30))  # ...but predicted: IoU 0, counted by mmseg's mIoU
    confusion = ConfusionMatrix(5)
    for p, t in zip(prediction, target, strict=True):
        confusion.update(torch.from_numpy(p), torch.from_numpy(t))
    metrics = confusion.compute(["a", "b", "c", "d", "e"])
    reference = reference_metrics(prediction, target, 5)
    assert abs(metrics["pixAcc"] - reference["pixAcc"]) < 1e-12
    assert abs(metrics["mIoU"] - np.nanmean(reference["IoU"])) < 1e-12  # class e (no union) is left out
    assert metrics["per_class"]["d"]["IoU"] == 0.0 and np.isnan(metrics["per_class"]["e"]["IoU"])
    assert abs(metrics["mIoU_all_classes"] - np.nan_to_num(reference["IoU"]).mean()) < 1e-12
    assert confusion.matrix.dtype == torch.int64 and int(confusion.matrix.sum()) == int((target != 255).sum())
    table = format_metrics_table(metrics)
    assert "pixAcc" in table and "n/a" in table
