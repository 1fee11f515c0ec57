"""The training loss: the ignore value, per-class weights and OHEM, checked by behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seg.engine.loss import IGNORE_INDEX, Ohem, hard_pixel_mask, segmentation_loss


def _batch(seed: int = 0, classes: int = 4, size: int = 12):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, size, size, generator=generator) * 2
    target = torch.randint(0, classes, (2, size, size), generator=generator)
    return logits, target


def test_ignored_pixels_change_nothing():
    logits, target = _batch()
    target[:, :4] = IGNORE_INDEX
    before = segmentation_loss(logits, target, 0.0)
    scrambled = logits.clone()
    scrambled[:, :, :4] = torch.randn_like(scrambled[:, :, :4]) * 50  # ignored pixels' logits: anything
    assert torch.equal(segmentation_loss(scrambled, target, 0.0), before)
    kept = target[:, 4:]
    assert torch.allclose(before, F.cross_entropy(logits[:, :, 4:], kept))


def test_a_zero_class_weight_removes_that_class_and_weights_form_a_weighted_mean():
    logits, target = _batch(1)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    weighted = segmentation_loss(logits, target, 0.0, class_weights=weights)
    without_class_1 = target.masked_fill(target == 1, IGNORE_INDEX)
    per_pixel = F.cross_entropy(logits, without_class_1, ignore_index=IGNORE_INDEX, reduction="none")
    w = weights[without_class_1.clamp(max=3)] * (without_class_1 != IGNORE_INDEX)
    assert torch.allclose(weighted, (per_pixel * w).sum() / w.sum())
    assert not torch.allclose(weighted, segmentation_loss(logits, target, 0.0))


def test_aux_term_is_added_with_its_weight_and_sees_every_pixel_under_ohem():
    main, target = _batch(2)
    aux, _ = _batch(3)
    ohem = Ohem(threshold=0.5, min_kept=10)
    total = segmentation_loss((main, aux), target, 0.4, ohem=ohem)
    expected = segmentation_loss(main, target, 0.0, ohem=ohem) + 0.4 * F.cross_entropy(aux, target)
    assert torch.allclose(total, expected)


def _mmseg_style_mask(logits, target, threshold, min_kept):
    """mmsegmentation's OHEMPixelSampler.sample, written out with a full sort."""
    valid = target != IGNORE_INDEX
    probability = logits.softmax(1).gather(1, target.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]
    probability = torch.where(valid, probability, torch.ones_like(probability))
    ordered = probability[valid].sort().values
    cut = max(threshold, ordered[min(min_kept, ordered.numel() - 1)].item()) if ordered.numel() else threshold
    return valid & (probability < cut)


@pytest.mark.parametrize("threshold,min_kept", [(0.7, 5), (0.3, 200), (0.05, 50), (0.9, 0)])
def test_ohem_keeps_what_mmsegmentation_keeps(threshold, min_kept):
    logits, target = _batch(4, size=16)
    target[0, :3] = IGNORE_INDEX
    kept = hard_pixel_mask(logits, target, Ohem(threshold, min_kept))
    assert torch.equal(kept, _mmseg_style_mask(logits, target, threshold, min_kept))
    assert not kept[target == IGNORE_INDEX].any()
    if min_kept:
        assert kept.sum() >= min(min_kept, int((target != IGNORE_INDEX).sum()) - 1)


def test_ohem_loss_averages_the_hard_pixels_only():
    logits, target = _batch(5, size=16)
    ohem = Ohem(threshold=0.6, min_kept=20)
    kept = hard_pixel_mask(logits, target, ohem)
    assert 20 <= kept.sum() < target.numel()
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(segmentation_loss(logits, target, 0.0, ohem=ohem), per_pixel[kept].mean())
    # An easy pixel made easier changes nothing; a hard one made harder raises the loss.
    easy = (~kept).nonzero()[0]
    sharper = logits.clone()
    sharper[easy[0], target[tuple(easy)], easy[1], easy[2]] += 5
    assert torch.allclose(segmentation_loss(sharper, target, 0.0, ohem=ohem), per_pixel[kept].mean())


def test_ohem_gradient_reaches_only_kept_pixels():
    logits, target = _batch(6, size=10)
    logits.requires_grad_(True)
    ohem = Ohem(threshold=0.5, min_kept=5)
    segmentation_loss(logits, target, 0.0, ohem=ohem).backward()
    kept = hard_pixel_mask(logits.detach(), target, ohem)
    touched = logits.grad.abs().sum(1) > 0
    assert torch.equal(touched, kept)
