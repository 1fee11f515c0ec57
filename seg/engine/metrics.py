"""Segmentation metrics from one confusion matrix accumulated over a whole dataset.

Conventions (REFERENCE section 4): ignored pixels never count; pixAcc = correct / labelled pixels; ``mIoU``
follows mmsegmentation (intersection and union summed over the dataset, then the mean over classes whose union
is non-empty: a class predicted but absent from the ground truth counts as 0); ``mIoU_all_classes`` is the mean
over every class with absent ones as 0 (PyTorch-Encoding, the paper's code).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """An int64 (num_classes x num_classes) matrix, rows = ground truth, columns = prediction.

    Args:
        num_classes: number of classes; target values outside [0, num_classes) (the ignore value) are skipped.
        device: where the matrix accumulates (keep it on the predictions' device: no host syncs per batch).
    """

    def __init__(self, num_classes: int, device: Optional[torch.device] = None) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add (N, H, W) or (H, W) integer predictions against targets of the same shape."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        n = self.num_classes
        target = target.reshape(-1).to(self.matrix.device)
        prediction = prediction.reshape(-1).to(self.matrix.device)
        valid = (target >= 0) & (target < n)
        index = target[valid].to(torch.int64) * n + prediction[valid].to(torch.int64)
        self.matrix += torch.bincount(index, minlength=n * n).reshape(n, n)

    def all_reduce(self) -> None:
        """Sum the matrices of every process (a no-op without a process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix)

    def compute(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
        """The metrics as fractions in [0, 1] (per-class entries NaN where undefined), and the matrix itself
        under ``confusion_matrix`` (rows = ground truth)."""
        matrix = self.matrix.cpu().numpy()
        return {**metrics_from_confusion(matrix, class_names), "confusion_matrix": matrix.tolist()}


def metrics_from_confusion(matrix: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """pixAcc, mIoU, mAcc, fwIoU, mIoU_all_classes, per-class IoU/accuracy and ``pixels`` (the labelled pixels
    counted: unlike the ratios, it shows whether every image was counted once) from a confusion matrix."""
    matrix = np.asarray(matrix, dtype=np.int64)
    num_classes = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    intersection = np.diag(matrix).astype(np.float64)
    ground_truth = matrix.sum(axis=1).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    union = ground_truth + predicted - intersection
    labelled = ground_truth.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
        accuracy = np.where(ground_truth > 0, intersection / ground_truth, np.nan)
        frequency = ground_truth / labelled if labelled > 0 else np.zeros(num_classes)
    present = union > 0
    return {
        "pixAcc": float(intersection.sum() / labelled) if labelled > 0 else float("nan"),
        "mIoU": float(np.nanmean(iou)) if present.any() else float("nan"),
        "mAcc": float(np.nanmean(accuracy)) if (ground_truth > 0).any() else float("nan"),
        "fwIoU": float(np.nansum(frequency * np.nan_to_num(iou))),
        "mIoU_all_classes": float(np.nan_to_num(iou).mean()),
        "pixels": int(labelled),
        "per_class": {
            name: {"IoU": float(iou[i]), "Acc": float(accuracy[i]), "pixels": int(ground_truth[i])}
            for i, name in enumerate(names)
        },
    }


def format_metrics_table(metrics: Dict[str, object]) -> str:
    """A plain-text per-class table followed by the summary line (percentages)."""
    per_class = metrics["per_class"]
    width = max(12, max(len(name) for name in per_class))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", f"{'-' * width}  {'-' * 6}  {'-' * 6}"]
    for name, values in per_class.items():
        iou = "  n/a " if np.isnan(values["IoU"]) else f"{100 * values['IoU']:6.2f}"
        acc = "  n/a " if np.isnan(values["Acc"]) else f"{100 * values['Acc']:6.2f}"
        lines.append(f"{name:<{width}}  {iou}  {acc}")
    lines.append(
        f"pixAcc {100 * metrics['pixAcc']:.2f}  mIoU {100 * metrics['mIoU']:.2f}  mAcc {100 * metrics['mAcc']:.2f}  "
        f"fwIoU {100 * metrics['fwIoU']:.2f}  mIoU(all classes) {100 * metrics['mIoU_all_classes']:.2f}"
    )
    return "\n".join(lines)

