"""Split-Attention convolution, the core of ResNeSt (Zhang et al., section 3 and appendix A)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from .conv import Conv2d
from .layers import DropBlock2d, pooled_batch_norm


class SplitAttentionConv2d(nn.Module):
    """A k x k convolution into ``radix`` splits per cardinal group, fused by a softmax attention over the splits.

    Radix-major layout (paper appendix A): the convolution's ``radix * channels`` outputs are ``radix`` blocks of
    ``channels``, block r holding split r of every cardinal group. The splits are summed and globally pooled,
    two grouped 1x1 convs (``fc1``, ``fc2``) predict per-channel logits, a softmax across the radix axis (a sigmoid
    when radix is 1) weights the splits, and their weighted sum is the output. The splits are channel slices of
    one tensor, never copied apart; the weighted sum is one multiply and R-1 in-place multiply-adds. Parameter
    names and shapes match the official ``SplAtConv2d``, so its weights load as they are.

    Args:
        in_channels: input channels.
        channels: output channels (``C``); the convolution itself produces ``radix * C``.
        kernel_size, stride, padding, dilation: of the split convolution.
        cardinality: number of cardinal groups (``K``).
        radix: number of splits per cardinal group (``R`` >= 1).
        reduction_factor: ``fc1`` width is ``max(in_channels * radix // reduction_factor, 32)``.
        norm_layer: normalisation constructor (BatchNorm2d or SyncBatchNorm).
        dropblock_prob: DropBlock probability applied after ``bn0`` (0 disables it).
    """

    conv_bn_pairs = (("conv", "bn0", "act0"), ("fc1", "bn1"))  # foldable for inference (fusion.py)

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        cardinality: int = 1,
        radix: int = 2,
        reduction_factor: int = 4,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        dropblock_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if radix < 1:
            raise ValueError(f"radix must be >= 1 for split attention, got {radix}")
        if channels % cardinality:
            raise ValueError(f"channels ({channels}) must be divisible by cardinality ({cardinality})")
        self.radix = radix
        self.cardinality = cardinality
        self.channels = channels
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.conv = Conv2d(  # dilated in layer3/layer4: seg's Conv2d picks its bf16 padding path by measurement
            in_channels,
            channels * radix,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=cardinality * radix,
            bias=False,
        )
        self.bn0 = norm_layer(channels * radix)
        self.dropblock: Optional[DropBlock2d] = DropBlock2d(dropblock_prob, 3) if dropblock_prob > 0 else None
        self.act0 = nn.ReLU(inplace=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=cardinality)
        self.bn1 = norm_layer(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=cardinality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, H, W) -> (N, channels, H', W')."""
        x = self.bn0(self.conv(x))
        if self.dropblock is not None:
            x = self.dropblock(x)
        x = self.act0(x)

        n = x.shape[0]
        r, c, k = self.radix, self.channels, self.cardinality
        # Pooling commutes with the sum over splits; pooling first avoids a full-size temporary.
        gap = x.mean((2, 3), keepdim=True)
        if r > 1:
            gap = gap.view(n, r, c, 1, 1).sum(1)
        gap = self.relu(pooled_batch_norm(self.bn1, self.fc1(gap)))
        logits = self.fc2(gap)  # (N, R*C, 1, 1), ordered (K, R, C/K) by the grouped fc2

        if r == 1:
            return x * torch.sigmoid(logits)
        attention = logits.view(n, k, r, c // k).transpose(1, 2).softmax(dim=1)  # (N, R, K, C/K)
        attention = attention.reshape(n, r, c, 1, 1)
        # One multiply, then in-place multiply-adds over views of the splits: no (N, R, C, H, W) product is
        # materialised, the views keep the input's memory format, and the backward of unbind is one stack.
        # A product-and-sum over the radix axis was 3x slower contiguous and 7x slower in channels_last.
        splits = x.view(n, r, c, x.shape[2], x.shape[3]).unbind(1)
        out = splits[0] * attention[:, 0]
        if n == 1:
            # The product's stride along a batch of one is arbitrary (the iterator put it between the channels and
            # the pixels); PyTorch's memory-format heuristic then reads channels_last as NCHW, and the avd pool and
            # the next convolution run their slow NCHW paths after a full copy. Same memory, canonical strides.
            out = out.as_strided(out.shape, (out.numel(),) + out.stride()[1:])
        for split in range(1, r):
            out = out.addcmul_(splits[split], attention[:, split])
        return out

    def extra_repr(self) -> str:
        return f"radix={self.radix}, cardinality={self.cardinality}, channels={self.channels}"
