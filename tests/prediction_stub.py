"""A stand-in network for tests that drive ``seg.eval`` with predictions chosen by the test."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class PredictionStub(torch.nn.Module):
    """Stands in for the network in ``seg.eval``: its logits make the given (H, W) train-id maps the predictions,
    one map per call, in evaluation order."""

    def __init__(self, predictions: Sequence[np.ndarray], num_classes: int) -> None:
        super().__init__()
        self.predictions = predictions
        self.num_classes = num_classes
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) images -> (1, num_classes, H, W) logits, 10 at the chosen class and 0 elsewhere."""
        prediction = torch.from_numpy(self.predictions[self.calls].astype(np.int64))
        self.calls += 1
        assert images.shape[0] == 1 and tuple(images.shape[2:]) == tuple(prediction.shape)
        logits = torch.zeros((1, self.num_classes) + tuple(prediction.shape))
        return logits.scatter_(1, prediction[None, None], 10.0)


def card_checkpoint(path, dataset: str, num_classes: int, weights=None, **card_fields):
    """Write a ``seg`` checkpoint of a DeepLabV3-ResNeSt14 card for ``dataset`` with ``num_classes`` classes and
    ``weights`` (default: none, for a run whose network is a PredictionStub); returns its path."""
    from seg.card import ModelCard
    from seg.engine.checkpoint import save_checkpoint

    card = ModelCard(segmentor="deeplabv3", backbone="resnest14", num_classes=num_classes,
                     classes=[f"class{i}" for i in range(num_classes)], palette=[(0, 0, 0)] * num_classes,
                     dataset=dataset, **card_fields)
    return save_checkpoint({"model": weights or {}, "config": {"dataset": dataset}, "card": card.to_dict()}, path)
