"""Small building blocks shared by backbones and heads: DropBlock and batch norm on pooled features."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al., 2018): drops contiguous ``block_size`` x ``block_size`` regions.

    The released ResNeSt weights were trained (in GluonCV) with DropBlock of block size 3 on layer3 and layer4,
    its probability ramped linearly from 0 to ``drop_prob`` over training. The ramp is driven from outside with
    :func:`set_dropblock_progress`; until it is called the full ``drop_prob`` applies. A no-op in eval mode.

    Args:
        drop_prob: the final probability of dropping a unit.
        block_size: side of the square blocks that are dropped.
    """

    def __init__(self, drop_prob: float = 0.0, block_size: int = 3) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.drop_prob = drop_prob
        self.block_size = block_size
        self.progress = 1.0

    @property
    def current_drop_prob(self) -> float:
        return self.drop_prob * self.progress

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> same shape."""
        p = self.current_drop_prob
        if not self.training or p <= 0.0:
            return x
        n, c, h, w = x.shape
        bs = min(self.block_size, h, w)
        valid_h, valid_w = h - bs + 1, w - bs + 1
        # Seeds are drawn only where a whole block fits; gamma makes the expected dropped fraction equal p.
        gamma = p * h * w / (bs * bs * valid_h * valid_w)
        seeds = (torch.rand(n, c, valid_h, valid_w, device=x.device) < gamma).to(x.dtype)
        # Each seed is the top-left corner of its block: pad by bs-1 on every side and max-pool with stride 1.
        dropped = F.max_pool2d(F.pad(seeds, (bs - 1, bs - 1, bs - 1, bs - 1)), kernel_size=bs, stride=1)
        keep = 1.0 - dropped
        scale = keep.numel() / keep.sum().clamp(min=1.0)
        return x * keep * scale

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"


def set_dropblock_progress(model: nn.Module, progress: float) -> None:
    """Set the DropBlock ramp of every :class:`DropBlock2d` in ``model``.

    Args:
        progress: fraction of training done, in [0, 1]; the drop probability is ``progress * drop_prob``.
    """
    progress = min(max(float(progress), 0.0), 1.0)
    for module in model.modules():
        if isinstance(module, DropBlock2d):
            module.progress = progress


def _synchronised_across_ranks(bn: _BatchNorm) -> bool:
    return (
        isinstance(bn, nn.SyncBatchNorm)
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


def pooled_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Apply ``bn`` to globally pooled features (N, C, 1, 1), surviving a batch of one in train mode.

    Batch statistics of one value per channel are undefined, so plain BatchNorm raises "Expected more than 1
    value per channel when training" for the ASPP image-pooling branch and the split-attention gate whenever a
    process sees a single image. In that one case this normalises with the running statistics (as in eval mode)
    and leaves them unchanged; the affine parameters still train. Every other case, SyncBatchNorm across several
    ranks included, is ``bn(x)`` unchanged.
    """
    single_value = x.shape[0] * x.shape[2] * x.shape[3] == 1
    if (
        bn.training
        and single_value
        and bn.running_mean is not None
        and bn.running_var is not None
        and not _synchronised_across_ranks(bn)
    ):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)
