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
        The 0-d mean loss over non-ignored pixels, in float32 at least: bf16/fp16 logits (autocast) are taken to
        float32 first, so the log-softmax and the mean over millions of pixels are never rounded to 8 mantissa bits.
    """
    if isinstance(outputs, tuple):
        main, aux = outputs
        return F.cross_entropy(_at_least_float32(main), target, ignore_index=IGNORE_INDEX) + aux_weight * (
            F.cross_entropy(_at_least_float32(aux), target, ignore_index=IGNORE_INDEX))
    return F.cross_entropy(_at_least_float32(outputs), target, ignore_index=IGNORE_INDEX)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits as float32; float32 and float64 ones as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
