"""ResNeSt and ResNet backbones, dilatable to output stride 16 or 8 for segmentation.

One bottleneck and one network class cover the whole family, with the official ResNeSt code's parameter
names, so published weights load strictly:

- ResNeSt (``radix`` >= 1): deep 3x3 stem, split-attention 3x3 conv, avd pooling, average-pool shortcut (ResNet-D).
- ResNet-50/101 baselines (``radix=0``, 7x7 stem, strided 1x1 shortcut): exactly torchvision's ResNet-B key
  layout, so torchvision's ImageNet weights load strictly too.

Dilation follows the official rule: a dilated stage runs at stride 1; its block 0 uses dilation 1 (dilation 2
for the x4 stage) and the other blocks the full dilation; block 0 keeps its avd pool as a stride-1 3x3 blur and
its shortcut pool becomes identity.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .conv import Conv2d
from .layers import DropBlock2d
from .registry import BACKBONES
from .split_attention import SplitAttentionConv2d

NormLayer = Callable[[int], nn.Module]


class Bottleneck(nn.Module):
    """ResNet/ResNeSt bottleneck: 1x1 reduce, 3x3 (split attention when radix >= 1), 1x1 expand, + shortcut.

    Args:
        inplanes: input channels.
        planes: base width of the stage; the block outputs ``planes * 4`` channels.
        stride: spatial stride of the block (1 or 2).
        downsample: shortcut projection, or None for identity.
        radix: 0 = plain conv + BN (ResNet), 1 = sigmoid attention, >= 2 = split attention.
        cardinality, bottleneck_width: the 3x3 stage is ``int(planes * bottleneck_width / 64) * cardinality`` wide.
        avd: replace the strided 3x3 conv by a stride-1 conv and a 3x3 average pool (only applied where
            ``stride > 1`` or ``is_first``).
        avd_first: pool before the 3x3 conv (the "-fast" variants) instead of after it.
        dilation: dilation of the 3x3 conv.
        is_first: block 0 of a stage other than layer1.
        dropblock_prob: DropBlock probability after each BN of the block (0 disables it).
        last_gamma: zero-initialise the last BN's weight.
    """

    expansion = 4
    # Foldable for inference (fusion.py): batch norms into their convolutions, act1/act2 into theirs, and the
    # residual sum and final ReLU into conv3.
    conv_bn_pairs = (("conv1", "bn1", "act1"), ("conv2", "bn2", "act2"), ("conv3", "bn3"))
    residual_conv = "conv3"

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        radix: int = 1,
        cardinality: int = 1,
        bottleneck_width: int = 64,
        avd: bool = False,
        avd_first: bool = False,
        dilation: int = 1,
        is_first: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        dropblock_prob: float = 0.0,
        last_gamma: bool = False,
    ) -> None:
        super().__init__()
        group_width = int(planes * (bottleneck_width / 64.0)) * cardinality
        self.radix = radix
        self.conv1 = nn.Conv2d(inplanes, group_width, kernel_size=1, bias=False)
        self.bn1 = norm_layer(group_width)

        self.avd = avd and (stride > 1 or is_first)
        self.avd_first = avd_first
        if self.avd:
            # count_include_pad stays True, as in the official code: border pixels are divided by 9.
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1

        if radix >= 1:
            self.conv2 = SplitAttentionConv2d(
                group_width,
                group_width,
                kernel_size=3,
                stride=stride,
                padding=dilation,
                dilation=dilation,
                cardinality=cardinality,
                radix=radix,
                norm_layer=norm_layer,
                dropblock_prob=dropblock_prob,
            )
            self.bn2: Optional[nn.Module] = None
        else:
            self.conv2 = Conv2d(  # dilated in layer3/layer4 (see seg.models.conv)
                group_width,
                group_width,
                kernel_size=3,
                stride=stride,
                padding=dilation,
                dilation=dilation,
                groups=cardinality,
                bias=False,
            )
            self.bn2 = norm_layer(group_width)
        self.conv3 = nn.Conv2d(group_width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        if last_gamma:
            nn.init.zeros_(self.bn3.weight)

        # DropBlock after bn1, bn2 (plain ResNet only: split attention has its own) and bn3.
        make_drop = (lambda: DropBlock2d(dropblock_prob, 3)) if dropblock_prob > 0 else (lambda: None)
        self.dropblock1: Optional[nn.Module] = make_drop()
        self.dropblock2: Optional[nn.Module] = make_drop() if radix == 0 else None
        self.dropblock3: Optional[nn.Module] = make_drop()

        self.act1 = nn.ReLU(inplace=True)
        self.act2 = nn.ReLU(inplace=True)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, inplanes, H, W) -> (N, planes * 4, H / stride, W / stride)."""
        shortcut = x if self.downsample is None else self.downsample(x)

        out = self.bn1(self.conv1(x))
        if self.dropblock1 is not None:
            out = self.dropblock1(out)
        out = self.act1(out)

        if self.avd and self.avd_first:
            out = self.avd_layer(out)
        out = self.conv2(out)
        if self.bn2 is not None:
            out = self.bn2(out)
            if self.dropblock2 is not None:
                out = self.dropblock2(out)
            out = self.act2(out)
        if self.avd and not self.avd_first:
            out = self.avd_layer(out)

        if getattr(self.conv3, "adds_residual", False):  # folded for inference: conv + shortcut + ReLU at once
            return self.conv3(out, shortcut)
        out = self.bn3(self.conv3(out))
        if self.dropblock3 is not None:
            out = self.dropblock3(out)
        # In place: ``out`` is a fresh tensor that neither bn3's nor conv3's backward needs, so the sum needs no
        # new full-size buffer (the shortcut may be the block's input and is left untouched).
        out += shortcut
        return self.relu(out)


def stage_dilations(output_stride: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(stride, dilation) of layer3 and layer4 for an output stride of 32, 16 or 8."""
    if output_stride == 32:
        return (2, 1), (2, 1)
    if output_stride == 16:
        return (2, 1), (1, 2)
    if output_stride == 8:
        return (1, 2), (1, 4)
    raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")


class ResNet(nn.Module):
    """ResNet / ResNeSt backbone with an optional classifier.

    ``forward(x)`` gives class logits (N, num_classes); ``forward_features(x)`` gives the four stage outputs
    [c1, c2, c3, c4] with ``feature_channels`` channels at strides 4, 8, 16, 32 (or 4, 8, 8, 8 at output stride 8).

    Args:
        layers: blocks per stage.
        radix, cardinality, bottleneck_width, avd, avd_first: see :class:`Bottleneck`.
        num_classes: classifier outputs; 0 builds no pooling and no classifier (a pure feature extractor).
        output_stride: 32, 16 or 8, reached by dilating layer4 (16) or layer3 and layer4 (8).
        deep_stem: three 3x3 convs (ResNeSt) instead of one 7x7 conv (ResNet).
        stem_width: width of the deep stem's first two convs; its output is ``2 * stem_width``.
        avg_down: average-pool shortcut (ResNet-D) instead of a strided 1x1 conv.
        dropblock_prob: DropBlock probability for layer3 and layer4 (0 disables it).
        final_drop: dropout probability before the classifier.
        last_gamma: zero-initialise the last BN of each block.
        norm_layer: normalisation constructor.
    """

    conv_bn_pairs = (("conv1", "bn1", "relu"),)  # the stem (its last conv when deep), bn1 and its ReLU (fusion.py)

    def __init__(
        self,
        layers: Sequence[int],
        radix: int = 0,
        cardinality: int = 1,
        bottleneck_width: int = 64,
        num_classes: int = 1000,
        output_stride: int = 32,
        deep_stem: bool = False,
        stem_width: int = 64,
        avg_down: bool = False,
        avd: bool = False,
        avd_first: bool = False,
        dropblock_prob: float = 0.0,
        final_drop: float = 0.0,
        last_gamma: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {list(layers)}")
        self.radix = radix
        self.cardinality = cardinality
        self.bottleneck_width = bottleneck_width
        self.avg_down = avg_down
        self.avd = avd
        self.avd_first = avd_first
        self.last_gamma = last_gamma
        self.norm_layer = norm_layer
        self.output_stride = output_stride
        self.inplanes = stem_width * 2 if deep_stem else 64

        if deep_stem:
            self.conv1: nn.Module = nn.Sequential(
                nn.Conv2d(3, stem_width, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, kernel_size=3, stride=1, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width * 2, kernel_size=3, stride=1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        (stride3, dilation3), (stride4, dilation4) = stage_dilations(output_stride)
        self.layer1 = self._make_layer(64, layers[0], is_first=False)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride3, dilation3, dropblock_prob)
        self.layer4 = self._make_layer(512, layers[3], stride4, dilation4, dropblock_prob)
        self.feature_channels: List[int] = [64 * 4, 128 * 4, 256 * 4, 512 * 4]

        self.num_classes = num_classes
        if num_classes > 0:
            self.drop: Optional[nn.Module] = nn.Dropout(final_drop) if final_drop > 0 else None
            self.fc: Optional[nn.Linear] = nn.Linear(512 * Bottleneck.expansion, num_classes)
        else:
            self.drop = None
            self.fc = None
        self._init_weights()

    def _make_layer(
        self,
        planes: int,
        blocks: int,
        stride: int = 1,
        dilation: int = 1,
        dropblock_prob: float = 0.0,
        is_first: bool = True,
    ) -> nn.Sequential:
        out_channels = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            shortcut: List[nn.Module] = []
            if self.avg_down:
                # No pooling for stride-1 or dilated stages (the official code's kernel-1 AvgPool2d there is an
                # identity that copies the whole map); nn.Identity keeps the Sequential's indices, so its keys.
                pool = stride if dilation == 1 else 1
                shortcut.append(nn.AvgPool2d(pool, pool, ceil_mode=True, count_include_pad=False) if pool > 1
                                else nn.Identity())
                shortcut.append(nn.Conv2d(self.inplanes, out_channels, kernel_size=1, bias=False))
            else:
                shortcut.append(nn.Conv2d(self.inplanes, out_channels, kernel_size=1, stride=stride, bias=False))
            shortcut.append(self.norm_layer(out_channels))
            downsample = nn.Sequential(*shortcut)

        block_kwargs = dict(
            radix=self.radix,
            cardinality=self.cardinality,
            bottleneck_width=self.bottleneck_width,
            avd=self.avd,
            avd_first=self.avd_first,
            norm_layer=self.norm_layer,
            dropblock_prob=dropblock_prob,
            last_gamma=self.last_gamma,
        )
        # Block 0 of a dilated stage runs at half the stage's dilation (1 for x2, 2 for x4).
        first_dilation = 1 if dilation in (1, 2) else dilation // 2
        blocks_list = [
            Bottleneck(
                self.inplanes,
                planes,
                stride,
                downsample=downsample,
                dilation=first_dilation,
                is_first=is_first,
                **block_kwargs,
            )
        ]
        self.inplanes = out_channels
        for _ in range(1, blocks):
            blocks_list.append(Bottleneck(self.inplanes, planes, dilation=dilation, **block_kwargs))
        return nn.Sequential(*blocks_list)

    def _init_weights(self) -> None:
        # He-normal fan-out for convs, as in the official code; unit-gamma BN except zero-init last gammas.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.last_gamma:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x: (N, 3, H, W) -> [c1, c2, c3, c4], each (N, feature_channels[i], H / s_i, W / s_i)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) -> class logits (N, num_classes)."""
        if self.fc is None:
            raise RuntimeError("this backbone was built with num_classes=0; use forward_features()")
        features = self.forward_features(x)[-1].mean((2, 3))
        if self.drop is not None:
            features = self.drop(features)
        return self.fc(features)


# --- factories -----------------------------------------------------------------------------------------------
# Published ResNeSt configurations: radix 2, cardinality 1, width 64, deep stem, avg-down shortcut, avd after the
# split-attention conv. The README's backbone table lists every registered name with its size and cost.

_RESNEST = dict(radix=2, cardinality=1, bottleneck_width=64, deep_stem=True, avg_down=True, avd=True, avd_first=False)
_RESNET = dict(radix=0, cardinality=1, bottleneck_width=64, deep_stem=False, avg_down=False, avd=False)


def _build(layers: Sequence[int], defaults: dict, knobs: dict) -> ResNet:
    return ResNet(layers, **{**defaults, **knobs})


@BACKBONES.register
def resnet50(**knobs) -> ResNet:
    """ResNet-50 (torchvision layout, ResNet-B): the paper's baseline."""
    return _build([3, 4, 6, 3], _RESNET, knobs)


@BACKBONES.register
def resnet101(**knobs) -> ResNet:
    """ResNet-101 (torchvision layout, ResNet-B): the paper's baseline."""
    return _build([3, 4, 23, 3], _RESNET, knobs)


@BACKBONES.register
def resnest14(**knobs) -> ResNet:
    """ResNeSt-14 (timm ``resnest14d``, GluonCV weights)."""
    return _build([1, 1, 1, 1], {**_RESNEST, "stem_width": 32}, knobs)


@BACKBONES.register
def resnest26(**knobs) -> ResNet:
    """ResNeSt-26 (timm ``resnest26d``, GluonCV weights)."""
    return _build([2, 2, 2, 2], {**_RESNEST, "stem_width": 32}, knobs)


@BACKBONES.register
def resnest50(**knobs) -> ResNet:
    """ResNeSt-50: 27,483,240 parameters with the ImageNet classifier."""
    return _build([3, 4, 6, 3], {**_RESNEST, "stem_width": 32}, knobs)


@BACKBONES.register
def resnest101(**knobs) -> ResNet:
    """ResNeSt-101: 48,275,016 parameters with the ImageNet classifier."""
    return _build([3, 4, 23, 3], {**_RESNEST, "stem_width": 64}, knobs)


@BACKBONES.register
def resnest200(**knobs) -> ResNet:
    """ResNeSt-200: 70,201,544 parameters with the ImageNet classifier."""
    return _build([3, 24, 36, 3], {**_RESNEST, "stem_width": 64}, knobs)


@BACKBONES.register
def resnest269(**knobs) -> ResNet:
    """ResNeSt-269: 110,929,480 parameters with the ImageNet classifier."""
    return _build([3, 30, 48, 8], {**_RESNEST, "stem_width": 64}, knobs)


# The paper's radix/cardinality ablation (Table 2, "-fast": avd before the 3x3 conv), named "{R}s{K}x{W}d".
def _fast(radix: int, cardinality: int, width: int, knobs: dict) -> ResNet:
    config = {**_RESNEST, "stem_width": 32, "avd_first": True}
    config.update(radix=radix, cardinality=cardinality, bottleneck_width=width)
    return _build([3, 4, 6, 3], config, knobs)


@BACKBONES.register
def resnest50_fast_1s1x64d(**knobs) -> ResNet:
    """ResNeSt-50-fast, radix 1, cardinality 1, width 64."""
    return _fast(1, 1, 64, knobs)


@BACKBONES.register
def resnest50_fast_2s1x64d(**knobs) -> ResNet:
    """ResNeSt-50-fast, radix 2, cardinality 1, width 64."""
    return _fast(2, 1, 64, knobs)


@BACKBONES.register
def resnest50_fast_4s1x64d(**knobs) -> ResNet:
    """ResNeSt-50-fast, radix 4, cardinality 1, width 64."""
    return _fast(4, 1, 64, knobs)


@BACKBONES.register
def resnest50_fast_1s2x40d(**knobs) -> ResNet:
    """ResNeSt-50-fast, radix 1, cardinality 2, width 40."""
    return _fast(1, 2, 40, knobs)


@BACKBONES.register
def resnest50_fast_2s2x40d(**knobs) -> ResNet:
    """ResNeSt-50-fast, radix 2, cardinality 2, width 40."""
    return _fast(2, 2, 40, knobs)


@BACKBONES.register
def resnest50_fast_4s2x40d(**knobs) -> ResNet:
    """ResNeSt-50-fast, radix 4, cardinality 2, width 40."""
    return _fast(4, 2, 40, knobs)


@BACKBONES.register
def resnest50_fast_1s4x24d(**knobs) -> ResNet:
    """ResNeSt-50-fast, radix 1, cardinality 4, width 24."""
    return _fast(1, 4, 24, knobs)
