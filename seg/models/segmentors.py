"""Segmentors: a backbone plus heads, upsampled to the input size. DeepLabV3 (the paper's model) and FCN."""

from __future__ import annotations

from typing import Callable, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import DeepLabV3Head, FCNHead, aspp_rates
from .registry import BACKBONES, SEGMENTORS

NormLayer = Callable[[int], nn.Module]


SegmentorOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class Segmentor(nn.Module):
    """A backbone, a main head on c4 and an optional auxiliary FCN head on c3.

    ``forward(x)`` with x (N, 3, H, W) returns logits (N, num_classes, H, W), upsampled bilinearly
    (align_corners=True, as in the paper's code). In train mode with an auxiliary head it returns the tuple
    (main, aux) of two such tensors; in eval mode the auxiliary head is not run.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, aux_head: nn.Module | None, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> SegmentorOutput:
        size = (x.shape[2], x.shape[3])
        _, _, c3, c4 = self.backbone.forward_features(x)
        out = upsample_logits(self.head(c4), size)
        if self.training and self.aux_head is not None:
            return out, upsample_logits(self.aux_head(c3), size)
        return out

    def low_res_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The main head's logits before upsampling: (N, 3, H, W) -> (N, num_classes, h, w) at the output stride.

        ``upsample_logits(low_res_logits(x), x.shape[2:])`` is ``forward(x)`` in eval mode. Inference uses it to
        flip a mirrored view's logits back at 1/64 of the pixels (the upsampling commutes with the flip).
        """
        return self.head(self.backbone.forward_features(x)[3])


def upsample_logits(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, *size): bilinear with align_corners=True, as in the paper's code."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def _assemble(
    main_head: Callable[[int], nn.Module],
    backbone: str,
    num_classes: int,
    output_stride: int,
    aux: bool,
    norm_layer: NormLayer,
    backbone_knobs: dict,
) -> Segmentor:
    """A feature-extractor backbone, ``main_head(c4 channels)`` and, with ``aux``, an FCN head on c3."""
    body = BACKBONES.get(backbone)(num_classes=0, output_stride=output_stride, norm_layer=norm_layer, **backbone_knobs)
    channels = body.feature_channels
    aux_head = FCNHead(channels[2], num_classes, norm_layer) if aux else None
    return Segmentor(body, main_head(channels[3]), aux_head, num_classes)


@SEGMENTORS.register
def deeplabv3(
    backbone: str = "resnest50",
    num_classes: int = 150,
    output_stride: int = 8,
    aux: bool = True,
    norm_layer: NormLayer = nn.BatchNorm2d,
    **backbone_knobs,
) -> Segmentor:
    """DeepLabV3: an ASPP head (256 channels) on c4 and, with ``aux``, an FCN head on c3."""
    rates = aspp_rates(output_stride)
    return _assemble(
        lambda channels: DeepLabV3Head(channels, num_classes, rates, norm_layer=norm_layer),
        backbone, num_classes, output_stride, aux, norm_layer, backbone_knobs,
    )


@SEGMENTORS.register
def fcn(
    backbone: str = "resnest50",
    num_classes: int = 150,
    output_stride: int = 8,
    aux: bool = True,
    norm_layer: NormLayer = nn.BatchNorm2d,
    **backbone_knobs,
) -> Segmentor:
    """FCN (the paper's FCN rows): an FCN head on c4 and, with ``aux``, another on c3."""
    return _assemble(
        lambda channels: FCNHead(channels, num_classes, norm_layer),
        backbone, num_classes, output_stride, aux, norm_layer, backbone_knobs,
    )
