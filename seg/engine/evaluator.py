"""Evaluation over a dataset: any inference mode, a confusion matrix accumulated across processes, each image
counted exactly once."""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils.data import Sampler
from tqdm import tqdm

from seg.data.base import SegmentationDataset
from seg.data.loader import GuardedDataLoader, GuardedDataset, distributed_context

from .inference import InferenceConfig, predict_probabilities
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


PredictionCallback = Callable[[int, torch.Tensor], None]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: SegmentationDataset,
    device: torch.device,
    inference: Optional[InferenceConfig] = None,
    workers: int = 2,
    channels_last: bool = False,
    progress: bool = True,
    on_prediction: Optional[PredictionCallback] = None,
) -> Dict[str, object]:
    """Evaluate ``model`` on ``dataset`` (eval transforms) with an inference mode (default: whole image).

    Each process takes its shard (:class:`ShardSampler`); the confusion matrices are summed across processes.
    ``on_prediction(index, prediction)`` receives every (H, W) prediction (e.g. to save it).

    Returns:
        The metrics of :func:`seg.engine.metrics.metrics_from_confusion`.

    Raises:
        DataError: an image or mask cannot be read (the message names the file), with any number of workers.
    """
    inference = inference or InferenceConfig()
    was_training = model.training
    model.eval()
    sampler = ShardSampler(len(dataset))
    # One image at a time (sizes differ); unbatched, so splits without labels (mask None) pass through. Guarded:
    # an unreadable image raises its one-line DataError here, not a worker's traceback. It is never skipped: a
    # metric over fewer images than the split is not the benchmark's number.
    # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, so validating
    # during training would shift the global random draws of the training steps after it (tested: a run with
    # more validations ends with the same weights).
    loader = GuardedDataLoader(GuardedDataset(dataset), batch_size=None, sampler=sampler, num_workers=workers,
                               pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    confusion = ConfusionMatrix(dataset.num_classes, device=device)
    batches = tqdm(loader, desc="evaluate", unit="img", disable=not progress, leave=False)
    for index, sample in zip(sampler, batches, strict=True):
        image = sample["image"][None].to(device, non_blocking=True)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        prediction = predict_probabilities(model, image, inference).argmax(1)
        if sample["mask"] is not None:
            confusion.update(prediction[0], sample["mask"].to(device, non_blocking=True))
        if on_prediction is not None:
            on_prediction(index, prediction[0])
    confusion.all_reduce()
    model.train(was_training)
    return confusion.compute(dataset.classes)
