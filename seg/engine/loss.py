"""The training objective: cross-entropy of the main logits plus a weighted auxiliary term (ignore = 255).

Kept apart from the training loop so that benchmarks and GPU checks measure the exact loss the trainer uses
without importing the data stack.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F

# The one ignore value inside seg, equal to seg.data.base.IGNORE_INDEX (tests/test_bench.py checks it).
IGNORE_INDEX = 255


def segmentation_loss(outputs: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], target: torch.Tensor,
                      aux_weight: float) -> torch.Tensor:
    """Cross-entropy of the main logits plus ``aux_weight`` x that of the auxiliary logits.

    Args:
        outputs: main logits (N, C, H, W), or a (main, aux) pair of them (a segmentor in train mode).
        target: (N, H, W) int64 class ids, 255 for ignored pixels.
        aux_weight: weight of the auxiliary term (ignored for a single tensor).

    Returns:
        The 0-d mean loss over non-ignored pixels.
    """
    if isinstance(outputs, tuple):
        main, aux = outputs
        return F.cross_entropy(main, target, ignore_index=IGNORE_INDEX) + aux_weight * F.cross_entropy(
            aux, target, ignore_index=IGNORE_INDEX
        )
    return F.cross_entropy(outputs, target, ignore_index=IGNORE_INDEX)
