"""Model size and cost: parameter counts and multiply-accumulates (MACs), as in the README's backbone table.

MACs are counted by PyTorch's own FLOP counter on the meta device, so nothing is computed or allocated and even
ResNeSt-269 at 512 x 512 is counted in moments. One multiply-add is one MAC (the paper calls it one FLOP);
convolutions and matrix products are counted, element-wise ops (BN, ReLU, pooling, softmax) are not.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(build: Callable[[], nn.Module], input_size: Tuple[int, int] = (224, 224), batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass of ``build()`` in eval mode on a (batch, 3, H, W) input.

    Args:
        build: constructs the model; it is called under the meta device.
    """
    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(batch, 3, *input_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def backbone_table(segmentation_size: Tuple[int, int] = (512, 512), num_classes: int = 150) -> str:
    """The README's Markdown table: every registered backbone's size and cost, as a classifier at 224 x 224
    and inside DeepLabV3 (output stride 8, aux head, ``num_classes``) at ``segmentation_size`` in eval mode."""
    from . import build_backbone, build_segmentor, list_backbones

    height, width = segmentation_size
    rows = [
        f"| backbone | params | GMACs (224) | DeepLabV3 params | DeepLabV3 GMACs ({height}x{width}, OS8) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in list_backbones():
        with torch.device("meta"):
            params = count_parameters(build_backbone(name))
            seg_params = count_parameters(build_segmentor("deeplabv3", backbone=name, num_classes=num_classes))
        macs = count_macs(lambda name=name: build_backbone(name))
        seg_macs = count_macs(
            lambda name=name: build_segmentor("deeplabv3", backbone=name, num_classes=num_classes),
            segmentation_size,
        )
        rows.append(
            f"| `{name}` | {params / 1e6:.2f}M | {macs / 1e9:.2f} | {seg_params / 1e6:.2f}M | {seg_macs / 1e9:.1f} |"
        )
    return "\n".join(rows)
