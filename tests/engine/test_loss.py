"""The training loss: the ignore value, per-class weights and OHEM, checked by behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seg.data.base import IGNORE_INDEX
from seg.engine.loss import Ohem, hard_pixel_mask, segmentation_loss


def _batch(seed: int = 0, classes: int = 4, size: int = 12):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, size, size, generator=generator) * 2
    target = torch.randint(0, classes, (2, size, size), generator=generator)
    return logits, target


def _loss_and_gradient(main, aux, target, path):
    """The loss of ``path``'s configuration and its gradients with respect to the main and auxiliary logits."""
    main, aux = main.clone().requires_grad_(True), aux.clone().requires_grad_(True)
    outputs = (main, aux) if path == "aux" else main
    weights = torch.tensor([1.0, 0.5, 2.0, 0.25]) if path == "class weights" else None
    ohem = Ohem(threshold=0.6, min_kept=10) if path == "ohem" else None
    loss = segmentation_loss(outputs, target, 0.4, class_weights=weights, ohem=ohem)
    loss.backward()
    return loss.detach(), main.grad, aux.grad if path == "aux" else torch.zeros_like(aux)


@pytest.mark.parametrize("path", ["plain", "aux", "class weights", "ohem"])
def test_pixels_the_datasets_mark_ignored_change_neither_loss_nor_gradients(path):
    """Pixels carrying the datasets' ignore value (padding, void): their logits may be anything, the loss and
    every other pixel's gradient stay the same bit for bit, and their own gradient is exactly zero."""
    main, target = _batch()
    aux, _ = _batch(7)
    ignored = torch.zeros(target.shape, dtype=torch.bool)
    ignored[:, :4] = True
    ignored[1, :, -3:] = True
    target[ignored] = IGNORE_INDEX
    loss, main_grad, aux_grad = _loss_and_gradient(main, aux, target, path)

    at_ignored = ignored[:, None].expand_as(main)
    scrambled_main = torch.where(at_ignored, torch.randn_like(main) * 50, main)
    scrambled_aux = torch.where(at_ignored, torch.randn_like(aux) * 50, aux)
    scrambled_loss, scrambled_main_grad, scrambled_aux_grad = _loss_and_gradient(scrambled_main, scrambled_aux,
                                                                                 target, path)
    assert torch.equal(scrambled_loss, loss)
    assert torch.equal(scrambled_main_grad, main_grad) and torch.equal(scrambled_aux_grad, aux_grad)
    assert torch.equal(main_grad[at_ignored], torch.zeros(int(at_ignored.sum())))
    assert torch.equal(aux_grad[at_ignored], torch.zeros(int(at_ignored.sum())))
    assert main_grad[~at_ignored].abs().sum() > 0  # the other pixels do train
    if path == "plain":  # the mean over the other pixels, written out
        negative_log_likelihood = -main.log_softmax(1).gather(1, target.clamp(max=3)[:, None])[:, 0]
        torch.testing.assert_close(loss, negative_log_likelihood[~ignored].mean(), rtol=1e-6, atol=0)


def test_the_ignore_value_is_not_a_class_even_where_it_could_be_one():
    """With 256 classes the ignore value would be a valid class id: it still means "ignore", and the id below it
    is still a class."""
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 256, 6, 6, generator=generator) * 3
    target = torch.randint(0, 256, (2, 6, 6), generator=generator)
    target[0, :2] = IGNORE_INDEX
    target[1, :2] = IGNORE_INDEX - 1
    counted = target != IGNORE_INDEX
    negative_log_likelihood = -logits.log_softmax(1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(segmentation_loss(logits, target, 0.0), negative_log_likelihood[counted].mean(),
                               rtol=1e-6, atol=0)


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
