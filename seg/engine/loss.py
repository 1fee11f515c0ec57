"""The training objective: cross-entropy of the main logits plus a weighted auxiliary term (ignore = 255), with
optional per-class weights and online hard example mining (OHEM) of the main head's pixels.

Kept apart from the training loop so that benchmarks and GPU checks measure the exact loss the trainer uses. The
ignore value is the datasets' own (:data:`seg.data.base.IGNORE_INDEX`), imported from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from seg.data.base import IGNORE_INDEX


@dataclass(frozen=True)
class Ohem:
    """mmsegmentation's OHEMPixelSampler: keep the pixels whose probability of their true class is below
    ``threshold``, and at least the ``min_kept`` hardest of the batch (so a well-fitted batch still trains).

    The kept pixels' cross-entropy is averaged over the kept pixels (as PSPNet's and HRNet's OhemCrossEntropy do);
    mmsegmentation averages over every pixel, which only rescales the loss by the kept fraction.
    """

    threshold: float = 0.7
    min_kept: int = 100000


def segmentation_loss(outputs: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], target: torch.Tensor,
                      aux_weight: float, class_weights: Optional[torch.Tensor] = None,
                      ohem: Optional[Ohem] = None) -> torch.Tensor:
    """Cross-entropy of the main logits plus ``aux_weight`` x that of the auxiliary logits.

    Args:
        outputs: main logits (N, C, H, W), or a (main, aux) pair of them (a segmentor in train mode).
        target: (N, H, W) int64 class ids, 255 for ignored pixels.
        aux_weight: weight of the auxiliary term (ignored for a single tensor).
        class_weights: (C,) float weights of the classes, or None; the mean is then weighted (PyTorch's rule).
        ohem: hard-pixel mining of the main term, or None. The auxiliary term sees every pixel, as in
            mmsegmentation's configs, which put the sampler in the decode head only.

    Returns:
        The 0-d mean loss over non-ignored pixels, in float32 at least: bf16/fp16 logits (autocast) are taken to
        float32 first, so the log-softmax and the mean over millions of pixels are never rounded to 8 mantissa bits.
    """
    main, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
    main = _at_least_float32(main)
    weight = None if class_weights is None else class_weights.to(main.device, main.dtype)
    if ohem is not None:
        loss = _ohem_cross_entropy(main, target, weight, ohem)
    else:
        loss = F.cross_entropy(main, target, weight=weight, ignore_index=IGNORE_INDEX)
    if aux is not None:
        loss = loss + aux_weight * F.cross_entropy(_at_least_float32(aux), target, weight=weight,
                                                   ignore_index=IGNORE_INDEX)
    return loss


def hard_pixel_mask(logits: torch.Tensor, target: torch.Tensor, ohem: Ohem) -> torch.Tensor:
    """(N, H, W) bool: the pixels OHEM keeps (never an ignored one), chosen without gradient.

    The threshold is ``ohem.threshold``, raised to the (``min_kept`` + 1)-th smallest true-class probability when
    fewer pixels than that fall below it (mmsegmentation's rule).
    """
    with torch.no_grad():
        valid = target != IGNORE_INDEX
        probability = torch.ones(target.shape, dtype=logits.dtype, device=logits.device)
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        true_class = logits.softmax(dim=1).gather(1, safe_target[:, None])[:, 0]
        probability = torch.where(valid, true_class, probability)
        threshold = torch.tensor(ohem.threshold, dtype=logits.dtype, device=logits.device)
        valid_probabilities = probability[valid]
        if ohem.min_kept > 0 and valid_probabilities.numel() > 0:
            # mmsegmentation's index: the (min_kept + 1)-th smallest, so at least min_kept pixels lie below it.
            position = min(ohem.min_kept, valid_probabilities.numel() - 1)
            threshold = torch.maximum(threshold, valid_probabilities.kthvalue(position + 1).values)
        return valid & (probability < threshold)


def _ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                        ohem: Ohem) -> torch.Tensor:
    kept = hard_pixel_mask(logits, target, ohem)
    mined = torch.where(kept, target, torch.full_like(target, IGNORE_INDEX))
    return F.cross_entropy(logits, mined, weight=weight, ignore_index=IGNORE_INDEX)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits as float32; float32 and float64 ones as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
