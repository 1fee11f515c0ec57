"""Segmentation heads as trained for the ResNeSt paper (PyTorch-Encoding, GluonCV): DeepLabV3's ASPP head and FCN.

Module names follow PyTorch-Encoding's (``aspp.b0`` ... ``aspp.project``, ``block``, ``conv5``) so that its published
DeepLab_ResNeSt*_ADE checkpoints map onto these modules by renaming prefixes only (see ``weights.py``).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
import torch.nn as nn

from .conv import Conv2d
from .layers import pooled_batch_norm

NormLayer = Callable[[int], nn.Module]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int, norm_layer: NormLayer):
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch of ASPP: global average pool, 1x1 conv, BN, ReLU, broadcast back to H x W."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer) -> None:
        super().__init__()
        # Indices 1 and 2 match Encoding's ``gap`` Sequential (index 0 was its AdaptiveAvgPool2d).
        self.gap = nn.Sequential(
            nn.Identity(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, out_channels, H, W)."""
        pooled = self.gap[1](x.mean((2, 3), keepdim=True))
        pooled = self.gap[3](pooled_batch_norm(self.gap[2], pooled))
        # Bilinear upsampling of a 1x1 map is a broadcast, so expand is exact.
        broadcast = pooled.expand(-1, -1, x.shape[2], x.shape[3])
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # A stride-0 tensor makes torch.cat choose NCHW, and the projection then copies the whole
            # concatenation back to channels_last: one small channels_last copy here is far cheaper.
            return broadcast.contiguous(memory_format=torch.channels_last)
        return broadcast


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches, image pooling, then a projection.

    Args:
        in_channels: channels of the input feature map (2048 for c4).
        atrous_rates: dilations of the three 3x3 branches.
        out_channels: width of every branch and of the projection.
    """

    def __init__(
        self,
        in_channels: int,
        atrous_rates: Sequence[int],
        out_channels: int = 256,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if len(atrous_rates) != 3:
            raise ValueError(f"ASPP takes three atrous rates, got {list(atrous_rates)}")
        self.b0 = _conv_bn_relu(in_channels, out_channels, 1, 1, norm_layer)
        self.b1 = _conv_bn_relu(in_channels, out_channels, 3, atrous_rates[0], norm_layer)
        self.b2 = _conv_bn_relu(in_channels, out_channels, 3, atrous_rates[1], norm_layer)
        self.b3 = _conv_bn_relu(in_channels, out_channels, 3, atrous_rates[2], norm_layer)
        self.b4 = ASPPPooling(in_channels, out_channels, norm_layer)
        self.project = nn.Sequential(
            nn.Conv2d(5 * out_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, H, W) -> (N, out_channels, H, W)."""
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))


class DeepLabV3Head(nn.Module):
    """ASPP, then 3x3 conv 256, BN, ReLU, Dropout(0.1) and a 1x1 classifier (with bias)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        atrous_rates: Sequence[int],
        channels: int = 256,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, atrous_rates, channels, norm_layer)
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, h, w) -> logits (N, num_classes, h, w)."""
        return self.block(self.aspp(x))


class FCNHead(nn.Module):
    """3x3 conv to ``in_channels // 4``, BN, ReLU, Dropout(0.1), 1x1 classifier: the auxiliary head and FCN."""

    def __init__(self, in_channels: int, num_classes: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        channels = in_channels // 4
        self.conv5 = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, h, w) -> logits (N, num_classes, h, w)."""
        return self.conv5(x)


def aspp_rates(output_stride: int) -> Tuple[int, int, int]:
    """ASPP dilations: (12, 24, 36) at output stride 8, scaled with the stride ((6, 12, 18) at 16)."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    r1, r2, r3 = (rate * 8 // output_stride for rate in (12, 24, 36))
    return r1, r2, r3
