"""DataLoaders whose augmentation is reproducible from one seed, with any number of workers and processes.

The :class:`SeededSampler` shuffles and shards the dataset itself (one shard per process, as
``DistributedSampler`` does) and hands every index out together with a seed derived from (seed, epoch,
position in the epoch). The dataset seeds the augmentation with it, so a sample's crop, flip and colours depend
neither on which worker draws it nor on how many workers there are, differ per epoch, and are the same again
after resuming from the middle of an epoch (``start``).
"""

from __future__ import annotations

import random
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


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
    """Seed Python's and NumPy's RNGs in a worker from the seed torch gave it (distinct per worker and per
    loader iteration), for any randomness outside the seeded augmentation."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int = 4,
    seed: int = 0,
    sampler: Optional[SeededSampler] = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` with a :class:`SeededSampler` (shuffled and dropping the last incomplete
    batch when ``train``), worker seeding, pinned memory on CUDA machines and persistent workers.

    Call ``loader.sampler.set_epoch(epoch)`` at the start of every epoch.
    """
    if sampler is None:
        sampler = SeededSampler(len(dataset), shuffle=train, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=train,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )
