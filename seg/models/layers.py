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
        isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm))
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
        isinstance(bn, _BatchNorm)  # not an Identity left by folding (fusion.py)
        and bn.training
        and single_value
        and bn.running_mean is not None
        and bn.running_var is not None
        and not _synchronised_across_ranks(bn)
    ):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of every rank's batch; the gradient sums are all-reduced the same way."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        reduce_dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        # float64 sums: E[x^2] - E[x]^2 loses digits in float32.
        stats = torch.cat([x.sum(reduce_dims, dtype=torch.float64), x.double().square().sum(reduce_dims),
                           torch.tensor([count], dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats, group=group)
        channels = x.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean.square()).clamp(min=0)
        if running_mean is not None:
            with torch.no_grad():
                unbiased = var * total / (total - 1).clamp(min=1)
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        normalised = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        ctx.save_for_backward(normalised, weight, invstd)
        ctx.group, ctx.total = group, total
        return normalised * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, grad_output):
        normalised, weight, invstd = ctx.saved_tensors
        reduce_dims = [0] + list(range(2, grad_output.dim()))
        shape = [1, grad_output.shape[1]] + [1] * (grad_output.dim() - 2)
        grad_weight = (grad_output * normalised).sum(reduce_dims)
        grad_bias = grad_output.sum(reduce_dims)
        sums = torch.cat([grad_bias, grad_weight]).double()
        dist.all_reduce(sums, group=ctx.group)
        channels = grad_output.shape[1]
        mean_dy = (sums[:channels] / ctx.total).to(grad_output.dtype).view(shape)
        mean_dy_xhat = (sums[channels:] / ctx.total).to(grad_output.dtype).view(shape)
        grad_input = (grad_output - mean_dy - normalised * mean_dy_xhat) * (invstd * weight).view(shape)
        # Parameter gradients stay local: DDP averages them across ranks like every other parameter's.
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics span every process of the group, on any device (gloo on CPU too).

    PyTorch's ``nn.SyncBatchNorm`` only runs on accelerators; this one all-reduces per-channel sums, so multi-
    process CPU training normalises exactly like one process holding the whole batch. Outside a process group
    of two or more, and in eval mode, it is plain BatchNorm. Same parameters and buffers as BatchNorm2d.
    """

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
            0.1 if self.momentum is None else self.momentum, self.process_group or dist.group.WORLD,
        )

    @classmethod
    def convert(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm2d in ``module`` by this class, keeping parameters and statistics."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group=process_group)
            reference = module.running_mean if module.running_mean is not None else module.weight
            if reference is not None:  # keep the original's device and precision
                converted.to(device=reference.device, dtype=reference.dtype)
            converted.load_state_dict(module.state_dict())
            converted.train(module.training)
            return converted
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child, process_group))
        return module
