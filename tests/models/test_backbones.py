"""Backbones: official structure, key layout, parameter counts, dilation, and logits parity with the reference
packages themselves (PyPI ``resnest`` 0.0.5, ``timm``, ``torchvision``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision  # a dependency of seg itself

from seg.models import build_backbone, list_backbones
from seg.models.complexity import count_parameters

OFFICIAL_PARAMS = {
    "resnest50": 27_483_240,
    "resnest101": 48_275_016,
    "resnest200": 70_201_544,
    "resnest269": 110_929_480,
}


def official_resnest():
    """The official ``resnest.torch`` package; imported by the tests that compare with it, so that the others run
    without it (and, under CI, its absence fails those tests rather than skipping the file)."""
    return pytest.importorskip("resnest.torch", reason="the official ResNeSt package (test extra) is needed")


def official_factory(name: str):
    official = official_resnest()
    from resnest.torch import ablation

    return getattr(official, name, None) or getattr(ablation, name)


def official_kwargs(output_stride: int) -> dict:
    return {32: {}, 16: {"dilation": 2}, 8: {"dilated": True}}[output_stride]


def shapes(state):
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_keys_shapes_and_parameter_count_equal_the_official_model(name):
    with torch.device("meta"):
        ours = build_backbone(name)
        official = official_factory(name)()
    assert shapes(ours.state_dict()) == shapes(official.state_dict())
    assert list(ours.state_dict()) == list(official.state_dict())
    assert count_parameters(ours) == OFFICIAL_PARAMS[name] == count_parameters(official)


@pytest.mark.parametrize("name", ["resnest50", "resnest101"])
def test_keys_equal_the_published_key_list(name, shared):
    listing = shared("reference", f"{name}_official_keys.txt").read_text().splitlines()
    published = {}
    for line in filter(None, listing):
        key, shape = line.split(" ", 1)
        published[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    with torch.device("meta"):
        ours = build_backbone(name, output_stride=8)  # dilation changes no key or shape
    assert shapes(ours.state_dict()) == published


def test_strict_load_with_and_without_num_batches_tracked():
    source = official_resnest().resnest50().state_dict()
    without = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    assert len(without) < len(source)
    for state in (source, without):
        model = build_backbone("resnest50")
        model.load_state_dict(state, strict=True)
        assert torch.equal(model.layer3[2].conv2.fc2.weight, source["layer3.2.conv2.fc2.weight"])


@pytest.mark.parametrize(
    "name,output_stride,size",
    [
        ("resnest50", 32, (96, 112)),
        ("resnest50", 16, (96, 112)),
        ("resnest50", 8, (97, 131)),
        ("resnest101", 8, (64, 80)),
        ("resnest50_fast_1s1x64d", 8, (64, 64)),  # radix 1: sigmoid attention
        ("resnest50_fast_4s2x40d", 32, (64, 96)),  # radix 4, cardinality 2, avd first
        ("resnest50_fast_1s4x24d", 16, (80, 64)),  # cardinality 4
    ],
)
def test_logits_match_the_official_package(name, output_stride, size, randomize_batchnorm):
    official = randomize_batchnorm(official_factory(name)(**official_kwargs(output_stride))).eval()
    ours = build_backbone(name, output_stride=output_stride).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, got = official(x), ours(x)
        assert expected.abs().max() > 0.5  # not a degenerate comparison
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        # In float64 the two agree to rounding: the same arithmetic, not merely close.
        torch.testing.assert_close(ours.double()(x.double()), official.double()(x.double()), rtol=0, atol=1e-9)


def test_dilated_stage_keeps_the_avd_blur_and_identity_shortcut_pool():
    model = build_backbone("resnest50", output_stride=8)
    for stage in (model.layer3, model.layer4):
        first = stage[0]
        assert first.avd and first.avd_layer.stride == 1 and first.avd_layer.kernel_size == 3
        assert isinstance(first.downsample[0], torch.nn.Identity)  # no shortcut pool (the official one is kernel 1)
    assert [b.conv2.conv.dilation[0] for b in model.layer3] == [1] + [2] * 5
    assert [b.conv2.conv.dilation[0] for b in model.layer4] == [2, 4, 4]


@pytest.mark.parametrize(
    "timm_name,ours", [("resnest50d", "resnest50"), ("resnest14d", "resnest14"), ("resnest26d", "resnest26")]
)
def test_timm_weights_load_strictly_and_match_timm_logits(timm_name, ours, randomize_batchnorm):
    timm = pytest.importorskip("timm", reason="timm (test extra) is needed")
    reference = randomize_batchnorm(timm.create_model(timm_name, pretrained=False)).eval()
    model = build_backbone(ours).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
@pytest.mark.parametrize("output_stride", [32, 8])
def test_torchvision_resnets_load_strictly_and_match(name, output_stride, randomize_batchnorm):
    dilation = [False, True, True] if output_stride == 8 else [False, False, False]
    reference = getattr(torchvision.models, name)(replace_stride_with_dilation=dilation)
    reference = randomize_batchnorm(reference).eval()
    model = build_backbone(name, output_stride=output_stride).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", list_backbones())
def test_feature_shapes_at_every_output_stride(name):
    with torch.device("meta"):
        for output_stride in (32, 16, 8):
            model = build_backbone(name, output_stride=output_stride)
            x = torch.empty(2, 3, 96, 128)
            features = model.forward_features(x)
            strides = {32: [4, 8, 16, 32], 16: [4, 8, 16, 16], 8: [4, 8, 8, 8]}[output_stride]
            assert [tuple(f.shape) for f in features] == [
                (2, c, 96 // s, 128 // s) for c, s in zip(model.feature_channels, strides, strict=True)
            ]
            assert tuple(model(x).shape) == (2, 1000)


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'resnest51'.*resnest50"):
        build_backbone("resnest51")


def test_radix_zero_is_a_plain_resnet_d_block():
    model = build_backbone("resnest50", radix=0)
    keys = model.state_dict().keys()
    assert "layer1.0.conv2.weight" in keys and "layer1.0.bn2.weight" in keys
    assert not any(".fc1." in key for key in keys)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_feature_extractor_has_no_classifier():
    model = build_backbone("resnest50", num_classes=0)
    assert "fc.weight" not in model.state_dict()
    assert count_parameters(model) == 25_434_240  # REFERENCE: DeepLabV3-ResNeSt50 backbone without fc
    with pytest.raises(RuntimeError, match="forward_features"):
        model(torch.randn(1, 3, 32, 32))


def test_train_mode_batch_of_one_and_gradients_reach_every_parameter():
    model = build_backbone("resnest14", dropblock_prob=0.1, final_drop=0.2).train()
    # With one image, every split-attention gate normalises one pooled value per channel and must not crash.
    logits = model(torch.randn(1, 3, 64, 64))
    logits.logsumexp(1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_batch_of_one_trains_the_same_in_channels_last():
    """A batch of one restrides the split-attention product (see SplitAttentionConv2d.forward): the loss and every
    gradient through that view and its in-place multiply-adds match the contiguous network's."""
    torch.manual_seed(0)
    model = build_backbone("resnest14", output_stride=8).train()
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 48, 48)
    model(x).logsumexp(1).sum().backward()
    nhwc(x.contiguous(memory_format=torch.channels_last)).logsumexp(1).sum().backward()
    for (name, plain), (_, channels_last) in zip(model.named_parameters(), nhwc.named_parameters(), strict=True):
        torch.testing.assert_close(channels_last.grad, plain.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_eval_output_is_deterministic_and_dropout_free():
    model = build_backbone("resnest14", dropblock_prob=0.1, final_drop=0.5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_knobs_change_the_architecture():
    model = build_backbone("resnest50", radix=4, cardinality=2, bottleneck_width=40, avd_first=True)
    block = model.layer2[0]
    assert block.conv2.radix == 4 and block.conv2.cardinality == 2 and block.avd_first
    assert block.conv2.conv.groups == 8 and block.conv1.out_channels == 2 * int(128 * 40 / 64)
    assert not build_backbone("resnest50", avd=False).layer2[0].avd
    assert isinstance(build_backbone("resnest14", final_drop=0.3).drop, nn.Dropout)
