"""The pictures people judge a training run by: training curves, the last validation's per-class IoU and
confusion matrix, and image | ground truth | prediction for the first validation image (plus its overlay).

It exists apart from the loop because it is reporting, not training: the trainer calls :func:`draw_run_pictures`
once at the end of a run (and the time-budget probe once, to time it), and it leaves the model as it found it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from seg.data import eval_transforms

from .inference import InferenceConfig, predict_probabilities
from .plots import overlay, save_confusion_matrix, save_per_class_iou, save_prediction_panels, save_training_curves


def draw_run_pictures(directory: Path, *, history: Mapping[str, Sequence[Tuple[float, float]]],
                      validation: Optional[Tuple[Dict[str, Any], int]], model: nn.Module, val_set,
                      inference: InferenceConfig, device: torch.device, iteration: int) -> List[str]:
    """Write the pictures into ``directory``; returns the file names written.

    ``validation``: the latest validation's (metrics, iteration), None before the first (then no per-class IoU or
    confusion matrix); the prediction is ``model``'s on ``val_set``'s first image with ``inference``.
    """
    names = ["curves.png"]
    save_training_curves(history, directory / "curves.png")
    if validation is not None:
        metrics, validated_at = validation
        per_class = {name: values["IoU"] for name, values in metrics["per_class"].items()}
        save_per_class_iou(per_class, directory / "per_class_iou.png", title=f"validation at iteration {validated_at}")
        save_confusion_matrix(metrics["confusion_matrix"], val_set.classes, directory / "confusion_matrix.png")
        names += ["per_class_iou.png", "confusion_matrix.png"]
    sample = val_set.load(0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        image = eval_transforms()(sample)["image"][None].to(device)
        prediction = predict_probabilities(model, image, inference).argmax(1)[0].cpu().numpy()
    model.train(was_training)
    save_prediction_panels(sample["image"], prediction, val_set.palette, val_set.classes,
                           directory / "prediction_panels.png", ground_truth=sample["mask"],
                           title=f"{Path(sample['path']).name}, iteration {iteration}")
    overlay(sample["image"], prediction, val_set.palette).save(directory / "prediction_overlay.png")
    return names + ["prediction_panels.png", "prediction_overlay.png"]
