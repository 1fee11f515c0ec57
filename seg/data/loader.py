"""DataLoaders whose augmentation is reproducible from one seed, with any number of workers and processes.

The :class:`SeededSampler` shuffles and shards the dataset itself (one shard per process, as
``DistributedSampler`` does) and hands every index out together with a seed derived from (seed, epoch,
position in the epoch). The dataset seeds the augmentation with it, so a sample's crop, flip and colours depend
neither on which worker draws it nor on how many workers there are, differ per epoch, and are the same again
after resuming from the middle of an epoch (``start``).

Unreadable files: a :class:`DataError` raised in a worker would reach the main process re-raised by PyTorch with
the worker's whole traceback as its message. :func:`build_dataloader` instead passes it back as data and raises it
in the main process with its own one-line message, or, with ``skip_bad_samples``, replaces the sample by the next
readable one (see :class:`GuardedDataset`).
"""

from __future__ import annotations

import random
from typing import Any, Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .io import DataError


def distributed_context() -> Tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 32-bit seed for the sample at ``position`` of ``epoch``'s global order."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class SeededSampler(Sampler):
    """Yields ``(index, seed)`` pairs for this process's shard of each epoch.

    Args:
        length: dataset size.
        shuffle: a new permutation each epoch (from ``seed`` and the epoch), else dataset order.
        seed: the run's seed.
        rank, world_size: the shard; default from ``torch.distributed``.
        drop_last: drop the tail that does not divide evenly between processes; otherwise pad by repeating
            the first indices (each padded repeat gets its own augmentation seed), so every process gets as many.
    """

    def __init__(
        self,
        length: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        default_rank, default_world = distributed_context()
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        if drop_last:
            self.per_rank = length // self.world_size
        else:
            self.per_rank = -(-length // self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first ``start`` samples of this shard (to resume mid-epoch)."""
        self.epoch = epoch
        self.start = start

    def global_order(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch * 1_000_003)
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        total = self.per_rank * self.world_size
        if total > self.length:
            order = torch.cat([order, order[: total - self.length]])
        return order[:total]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = self.global_order()
        for local in range(self.start, self.per_rank):
            position = local * self.world_size + self.rank
            yield int(order[position]), sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.per_rank - self.start


def seed_worker(worker_id: int) -> None:
    """A DataLoader worker's set-up: OpenCV single-threaded (the workers are the parallelism; OpenCV's own threads
    in every worker would oversubscribe the cores), and Python's and NumPy's RNGs seeded from the seed torch gave
    it (distinct per worker and per loader iteration), for any randomness outside the seeded augmentation."""
    cv2.setNumThreads(1)
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


class GuardedDataset(Dataset):
    """``dataset`` whose unreadable samples travel to the main process as data instead of as worker exceptions.

    An item that raises :class:`DataError` becomes ``{"error": message}`` (the loader raises it), or, with
    ``skip_bad_samples``, the next readable item in dataset order (wrapping around) with the same augmentation seed,
    so a batch stays a pure function of the sampler's output and a resumed run sees exactly the same data. Every
    item carries ``"skipped"``: the messages of the files it stands in for (usually none).
    """

    def __init__(self, dataset: Dataset, skip_bad_samples: bool = False) -> None:
        self.dataset = dataset
        self.skip_bad_samples = skip_bad_samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> Dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        skipped: List[str] = []
        for offset in range(len(self.dataset)):
            candidate = (index + offset) % len(self.dataset)
            try:
                sample = self.dataset[(candidate, seed)]
            except DataError as error:
                if not self.skip_bad_samples:
                    return {"error": str(error)}
                skipped.append(str(error))
                continue
            return {**sample, "skipped": skipped}
        return {"error": f"no readable sample left: all {len(self.dataset)} were skipped, e.g. {skipped[0]}"}


def collate_guarded(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Collate :class:`GuardedDataset` items: the first error alone if there is one, else the batch with
    ``"skipped"`` holding every replaced file's message."""
    errors = [sample["error"] for sample in samples if "error" in sample]
    if errors:
        return {"error": errors[0]}
    skipped = [message for sample in samples for message in sample.pop("skipped")]
    return {**default_collate(samples), "skipped": skipped}


class GuardedDataLoader(DataLoader):
    """A DataLoader over a :class:`GuardedDataset` that raises its errors as :class:`DataError` in the main
    process, with the message naming the file."""

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for batch in super().__iter__():
            if "error" in batch:
                raise DataError(batch["error"])
            yield batch


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int = 4,
    seed: int = 0,
    sampler: Optional[SeededSampler] = None,
    skip_bad_samples: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` with a :class:`SeededSampler` (shuffled and dropping the last incomplete
    batch when ``train``), worker seeding, pinned memory on CUDA machines and persistent workers.

    An unreadable file raises :class:`DataError` naming it in the main process, whatever the number of workers;
    with ``skip_bad_samples`` its sample is replaced by the next readable one instead. Each batch holds the
    collated ``image``, ``mask`` and ``path``, and ``skipped``: the messages of the files replaced in it.

    Call ``loader.sampler.set_epoch(epoch)`` at the start of every epoch.
    """
    if sampler is None:
        sampler = SeededSampler(len(dataset), shuffle=train, seed=seed)
    return GuardedDataLoader(
        GuardedDataset(dataset, skip_bad_samples),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=train,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
        collate_fn=collate_guarded,
        generator=torch.Generator().manual_seed(seed),
    )
