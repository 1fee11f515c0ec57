"""DropBlock and the batch-of-one-safe pooled BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from seg.models import DropBlock2d, build_backbone, set_dropblock_progress
from seg.models.layers import pooled_batch_norm


def test_dropblock_is_identity_in_eval_and_at_zero_probability():
    x = torch.randn(2, 4, 16, 16)
    assert torch.equal(DropBlock2d(0.3, 3).eval()(x), x)
    assert torch.equal(DropBlock2d(0.0, 3).train()(x), x)


def test_dropblock_drops_the_expected_fraction_in_square_blocks():
    drop = DropBlock2d(0.1, 3).train()
    x = torch.ones(8, 16, 32, 32)
    out = drop(x)
    dropped = out == 0
    fraction = dropped.float().mean().item()
    assert 0.07 < fraction < 0.13  # expected 0.1 (blocks overlapping near each other make it a little less)
    kept_value = out[~dropped].unique()
    assert kept_value.numel() == 1 and kept_value.item() == pytest.approx(1 / (1 - fraction), rel=1e-5)
    # Every dropped pixel lies in some fully dropped 3x3 square: blocks, not scattered units.
    # (A morphological opening: erode to the top-left corners of full squares, then dilate back.)
    corners = -nn.functional.max_pool2d(-dropped.float(), 3, stride=1)
    covered = nn.functional.max_pool2d(nn.functional.pad(corners, (2, 2, 2, 2)), 3, stride=1)
    assert torch.equal(covered[dropped], torch.ones_like(covered[dropped]))


def dropped_fractions(model: nn.Module, x: torch.Tensor) -> dict:
    """Run ``model`` on ``x``; for each DropBlock2d in it, the fraction of its non-zero inputs it zeroed."""
    fractions = {}

    def record(name):
        def hook(module, inputs, output):
            live = inputs[0] != 0
            fractions[name] = ((output == 0) & live).sum().item() / live.sum().item()
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
               if isinstance(module, DropBlock2d)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return fractions


def test_the_backbone_drops_blocks_in_layer3_and_layer4_at_the_ramped_probability():
    """Through the backbone's own forward in train mode: each DropBlock of layer3 and layer4 (per block after bn1,
    the split-attention bn0 and bn3) is reached and drops about ``progress x drop_prob`` of its units."""
    model = build_backbone("resnest14", dropblock_prob=0.2).train()
    names = [name for name, module in model.named_modules() if isinstance(module, DropBlock2d)]
    assert len(names) == 3 * (len(model.layer3) + len(model.layer4))
    assert {name.split(".")[0] for name in names} == {"layer3", "layer4"}
    blocks = [model.get_submodule(name) for name in names]
    set_dropblock_progress(model, 0.25)
    assert all(block.current_drop_prob == pytest.approx(0.05) for block in blocks)
    set_dropblock_progress(model, 2.0)  # clamped to the end of the ramp
    assert all(block.current_drop_prob == pytest.approx(0.2) for block in blocks)
    x = torch.randn(4, 3, 128, 128)
    torch.manual_seed(1)
    with torch.no_grad():
        for progress in (1.0, 0.5):
            set_dropblock_progress(model, progress)
            fractions = dropped_fractions(model, x)
            assert sorted(fractions) == sorted(names)  # every DropBlock ran
            expected = 0.2 * progress
            # About the probability (overlapping blocks make it a little less: 0.9 of it on 4x4 and 8x8 maps),
            # over thousands of channel maps each, so sampling noise stays near 1 % of it.
            assert all(0.8 * expected < fraction < 1.05 * expected for fraction in fractions.values()), fractions
        set_dropblock_progress(model, 0.0)
        assert set(dropped_fractions(model, x).values()) == {0.0}
        model.eval()
        set_dropblock_progress(model, 1.0)
        assert set(dropped_fractions(model, x).values()) == {0.0}


def test_dropblock_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="drop_prob"):
        DropBlock2d(1.0)


def test_pooled_batch_norm_with_one_value_uses_running_statistics():
    bn = nn.BatchNorm2d(4).train()
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0)
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(x)
    out = pooled_batch_norm(bn, x)
    torch.testing.assert_close(out, (x - 0.5) / torch.sqrt(torch.tensor(4.0) + bn.eps))
    assert torch.equal(bn.running_mean, torch.full((4,), 0.5))  # statistics untouched


def test_pooled_batch_norm_with_a_batch_is_plain_batch_norm():
    bn = nn.BatchNorm2d(4).train()
    x = torch.randn(3, 4, 1, 1)
    reference = nn.BatchNorm2d(4).train()
    torch.testing.assert_close(pooled_batch_norm(bn, x), reference(x))
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
