"""Evaluation over a dataset: whole-image inference, a confusion matrix accumulated across processes, each
image counted exactly once."""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from seg.data.base import SegmentationDataset
from seg.data.loader import distributed_context

from .metrics import ConfusionMatrix


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...``: every image on exactly one process, no padding duplicates."""

    def __init__(self, length: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        default_rank, default_world = distributed_context()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.length = length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: SegmentationDataset,
    device: torch.device,
    workers: int = 2,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    progress: bool = True,
) -> Dict[str, object]:
    """Whole-image evaluation of ``model`` (eval mode) on ``dataset`` (with eval transforms).

    Returns the metrics of :func:`seg.engine.metrics.metrics_from_confusion` over all processes' images.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset)), num_workers=workers,
                        pin_memory=device.type == "cuda")
    confusion = ConfusionMatrix(dataset.num_classes, device=device)
    for batch in tqdm(loader, desc="validate", unit="img", disable=not progress, leave=False):
        image = batch["image"].to(device, non_blocking=True)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(image)
        confusion.update(logits.argmax(1), batch["mask"].to(device, non_blocking=True))
    confusion.all_reduce()
    model.train(was_training)
    return confusion.compute(dataset.classes)
