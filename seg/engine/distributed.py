"""Process-group setup for ``torchrun`` (one process per device; a single process needs no launcher) and
synchronised BatchNorm: PyTorch's on CUDA, ``seg.models.layers.SyncBatchNorm`` on CPU (gloo)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from seg.config import ConfigError
from seg.models.layers import SyncBatchNorm

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when there is one, else the CPU; ``cuda`` without a GPU, or another name, is
    a :class:`~seg.config.ConfigError` about the ``device`` setting (a ValueError)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{requested} was requested but no CUDA device is available; use cpu")
        return torch.device("cuda", local_rank if requested == "cuda" else int(requested.split(":")[1]))
    if requested != "cpu":
        raise ConfigError("device", f"must be auto, cpu or cuda, got {requested!r}")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        # torchrun keeps one key-value store across the restarts of --max-restarts and does not separate the
        # attempts: a restarted rank could read its dead peer's address from the previous attempt and hang.
        # Each attempt therefore gets its own key prefix.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store, rank, world_size = next(dist.rendezvous("env://"))
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo",
                                store=dist.PrefixStore(f"seg/attempt_{attempt}", store), rank=rank,
                                world_size=world_size)
    return DistributedContext(rank, local_rank, world_size, chosen)


class StopVote:
    """Whether any process was asked to stop, agreed by all of them at the same iteration.

    A scheduler's SIGTERM may reach the ranks one at a time, or only one of them. A rank that saved and returned
    alone would leave the others waiting forever in their next collective (and its own checkpoint gather would
    meet theirs out of order). Every rank therefore votes once per iteration, on a small CPU (gloo) group of its
    own so that a CUDA run pays no device synchronisation: one 8-byte all-reduce, well under a millisecond on one
    machine.
    """

    def __init__(self, world_size: int) -> None:
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None  # collective: every rank calls it
        self.ballot = torch.zeros(1, dtype=torch.int64)

    def agree(self, local_signal: Optional[int]) -> Optional[int]:
        """The signal number any rank received (the highest, if several), or None; the same on every rank."""
        if self.group is None:
            return local_signal
        self.ballot.fill_(local_signal or 0)
        dist.all_reduce(self.ballot, op=dist.ReduceOp.MAX, group=self.group)
        return int(self.ballot.item()) or None

    def wait_for_all(self) -> None:
        """Return once every rank got here: no rank exits (and makes ``torchrun`` end the others) while rank 0 is
        still writing the checkpoint."""
        if self.group is not None:
            dist.barrier(group=self.group)


def shard(items: Sequence[T], rank: int, world_size: int) -> List[T]:
    """Rank ``rank``'s share of ``items``: positions ``rank``, ``rank + world_size``, ... The shares of ranks 0 to
    ``world_size - 1`` partition ``items`` (each item in exactly one share; the first ``len % world_size`` shares
    one item longer), and one process (``world_size`` 1) takes them all."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of {world_size} process(es)")
    return list(items[rank::world_size])


def object_group() -> Optional[dist.ProcessGroup]:
    """The group to exchange small Python objects on (``all_gather_object``, ``broadcast_object_list``): the
    default group when it is gloo (``None``), else a new gloo group of every rank, so that a CUDA run does not
    pickle them through NCCL device buffers. Creating one is a collective: every rank calls this."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace BatchNorm by its cross-process version (only meaningful with more than one process)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return SyncBatchNorm.convert(model)
