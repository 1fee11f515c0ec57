"""Models: ResNeSt/ResNet backbones, DeepLabV3 and FCN segmentors, and published-weight loading.

    >>> from seg.models import build_backbone, build_segmentor
    >>> net = build_backbone("resnest50", output_stride=8, num_classes=0)
    >>> model = build_segmentor("deeplabv3", backbone="resnest101", num_classes=150)
"""

from __future__ import annotations

from typing import List, Optional

from . import resnet as _resnet  # noqa: F401  (registers the backbones)
from . import segmentors as _segmentors  # noqa: F401  (registers the segmentors)
from .layers import DropBlock2d, set_dropblock_progress
from .registry import BACKBONES, SEGMENTORS
from .resnet import ResNet
from .segmentors import Segmentor
from .weights import (
    PUBLISHED_WEIGHTS,
    PretrainedWeightsError,
    WeightsSource,
    list_published_weights,
    load_pretrained,
)

__all__ = [
    "DropBlock2d",
    "PretrainedWeightsError",
    "PUBLISHED_WEIGHTS",
    "ResNet",
    "Segmentor",
    "build_backbone",
    "build_segmentor",
    "list_backbones",
    "list_published_weights",
    "list_segmentors",
    "load_pretrained",
    "set_dropblock_progress",
]


def list_backbones() -> List[str]:
    """Registered backbone names."""
    return BACKBONES.names()


def list_segmentors() -> List[str]:
    """Registered segmentor names."""
    return SEGMENTORS.names()


def build_backbone(
    name: str,
    output_stride: int = 32,
    num_classes: int = 1000,
    pretrained: Optional[WeightsSource] = None,
    **knobs,
) -> ResNet:
    """Build a registered backbone.

    Args:
        name: one of :func:`list_backbones` (ValueError listing the choices otherwise).
        output_stride: 32, 16 or 8 (dilated layer4, or layer3 and layer4).
        num_classes: classifier width; 0 for a feature extractor without pooling and classifier.
        pretrained: weights for :func:`load_pretrained` (a published name, a path or a state dict); a
            classifier of another width keeps its initial values.
        **knobs: architecture overrides: ``radix``, ``cardinality``, ``bottleneck_width``, ``avd``,
            ``avd_first``, ``dropblock_prob``, ``final_drop``, ``last_gamma``, ``stem_width``, ``norm_layer``.

    Returns:
        A module whose ``forward(x)`` gives (N, num_classes) logits and ``forward_features(x)`` [c1, c2, c3, c4].
    """
    model = BACKBONES.get(name)(output_stride=output_stride, num_classes=num_classes, **knobs)
    if pretrained is not None:
        load_pretrained(model, pretrained, reset_classifier=True)
    return model


def build_segmentor(
    name: str = "deeplabv3",
    backbone: str = "resnest50",
    num_classes: int = 150,
    output_stride: int = 8,
    aux: bool = True,
    pretrained_backbone: Optional[WeightsSource] = None,
    pretrained: Optional[WeightsSource] = None,
    **knobs,
) -> Segmentor:
    """Build a registered segmentor.

    Args:
        name: ``deeplabv3`` or ``fcn`` (see :func:`list_segmentors`).
        backbone: a registered backbone name.
        num_classes: output classes.
        output_stride: backbone output stride (8 as in the paper; ASPP rates scale with it).
        aux: add the auxiliary FCN head on c3 (its logits are returned in train mode only).
        pretrained_backbone: ImageNet weights for the backbone (a published name, a path or a state dict).
        pretrained: weights for the whole segmentor, e.g. ``deeplab_resnest50_ade`` or a ``seg`` checkpoint.
        **knobs: backbone overrides (see :func:`build_backbone`) and ``norm_layer``.

    Returns:
        A :class:`Segmentor`: x (N, 3, H, W) -> logits (N, num_classes, H, W) (and aux logits in train mode).
    """
    if backbone not in BACKBONES:
        BACKBONES.get(backbone)  # raises the ValueError listing the choices
    model = SEGMENTORS.get(name)(
        backbone=backbone, num_classes=num_classes, output_stride=output_stride, aux=aux, **knobs
    )
    if pretrained_backbone is not None:
        load_pretrained(model.backbone, pretrained_backbone, reset_classifier=True)
    if pretrained is not None:
        load_pretrained(model, pretrained, reset_classifier=True)
    return model
