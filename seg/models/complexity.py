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
