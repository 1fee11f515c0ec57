"""Inference modes: whole, slide, multi-scale + flip; equalities that pin them down exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from seg.engine.inference import InferenceConfig, class_probabilities, predict_probabilities, window_starts
from seg.models import build_segmentor


class Pointwise(nn.Module):
    """A per-pixel classifier: any windowing or flipping of it must give back the whole-image answer."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 1)
        self.scale = scale

    def forward(self, x):
        return self.conv(x) * self.scale


def test_window_starts_cover_the_axis_with_the_last_window_flush():
    assert window_starts(100, 40, 26) == [0, 26, 52, 60]
    assert window_starts(40, 40, 26) == [0] and window_starts(30, 40, 26) == [0]
    for length, crop, stride in [(1000, 512, 341), (97, 32, 21), (513, 512, 1)]:
        starts = window_starts(length, crop, stride)
        assert starts[-1] + crop == length and all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


def test_one_scale_no_flip_is_whole_exactly():
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=4).eval()
    image = torch.randn(1, 3, 67, 91)
    with torch.no_grad():
        expected = model(image).softmax(1)
    assert torch.equal(predict_probabilities(model, image, InferenceConfig()), expected)


@pytest.mark.parametrize("size", [(50, 70), (20, 30)])
def test_slide_and_flip_of_a_pointwise_model_equal_whole(size):
    model = Pointwise()
    image = torch.randn(2, 3, *size)
    whole = predict_probabilities(model, image, InferenceConfig())
    slide = predict_probabilities(model, image, InferenceConfig(mode="slide", crop_size=24, stride=10))
    flipped = predict_probabilities(model, image, InferenceConfig(flip=True))
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(flipped, whole, rtol=0, atol=1e-6)


def test_multi_scale_averages_probabilities_at_the_original_resolution():
    model = Pointwise()
    image = torch.randn(1, 3, 40, 60)
    same = predict_probabilities(model, image, InferenceConfig(scales=(1.0, 1.0)))
    torch.testing.assert_close(same, predict_probabilities(model, image, InferenceConfig()), rtol=0, atol=1e-7)
    multi = predict_probabilities(model, image, InferenceConfig(scales=(0.5, 1.5), flip=True, base_size=80))
    assert multi.shape == (1, 5, 40, 60)
    torch.testing.assert_close(multi.sum(1), torch.ones(1, 40, 60))


def test_huge_logits_do_not_overflow():
    model = Pointwise(scale=1e4)  # exp(logits) would be inf in float32
    image = torch.randn(1, 3, 16, 16)
    probabilities = predict_probabilities(model, image, InferenceConfig(scales=(0.75, 1.0), flip=True))
    assert torch.isfinite(probabilities).all()


def test_ms_flip_slide_on_a_real_model_keeps_the_size():
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=3).eval()
    image = torch.randn(1, 3, 45, 61)
    config = InferenceConfig(mode="slide", crop_size=32, scales=(0.75, 1.25), flip=True, base_size=64)
    out = predict_probabilities(model, image, config)
    assert out.shape == (1, 3, 45, 61) and torch.isfinite(out).all()


def naive_ms_flip(model, image, scales, crop, stride, base_size):
    """Multi-scale + flip written out plainly, the unoptimised definition: for every scale, every window and its
    mirror image run one at a time through the full model, the mirror's probabilities are flipped back at full
    size, each window's views averaged with its neighbours', resized back, averaged over scales."""
    import torch.nn.functional as F

    from seg.engine.inference import scaled_size

    height, width = image.shape[2:]
    result = 0
    for scale in scales:
        size = scaled_size(height, width, scale, base_size)
        view = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
        padded = F.pad(view, (0, max(crop - size[1], 0), 0, max(crop - size[0], 0)))
        total = torch.zeros(1, model.num_classes, *padded.shape[2:])
        counts = torch.zeros(1, 1, *padded.shape[2:])
        for y in window_starts(padded.shape[2], crop, stride):
            for x in window_starts(padded.shape[3], crop, stride):
                window = padded[:, :, y : y + crop, x : x + crop]
                plain = model(window).softmax(1)
                mirrored = model(window.flip(-1)).softmax(1).flip(-1)
                total[:, :, y : y + crop, x : x + crop] += plain + mirrored
                counts[:, :, y : y + crop, x : x + crop] += 2
        per_scale = (total / counts)[:, :, : size[0], : size[1]]
        result = result + F.interpolate(per_scale, size=(height, width), mode="bilinear", align_corners=True)
    return result / len(scales)


def test_ms_flip_equals_the_plain_definition_window_by_window():
    """The batched windows, the mirror's logits flipped before upsampling (for a Segmentor) or its probabilities
    after (for any other module), the folded divisions: the same numbers as the plain loop, within 1e-5."""
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=6).eval()
    with torch.no_grad():
        model.head.block[-1].weight.mul_(30)  # confident, varied probabilities: differences in the windowing show
    image = torch.randn(1, 3, 45, 61)
    config = InferenceConfig(mode="slide", crop_size=32, stride=20, scales=(0.5, 1.0, 1.5), flip=True,
                             base_size=64, window_batch=4)
    with torch.no_grad():
        expected = naive_ms_flip(model, image, config.scales, 32, 20, 64)
        fast = predict_probabilities(model, image, config)
        wrapped = predict_probabilities(nn.Sequential(model), image, config)  # not a Segmentor: full-size flip
        channels_last = predict_probabilities(model.to(memory_format=torch.channels_last),
                                              image.contiguous(memory_format=torch.channels_last), config)
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(wrapped, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(channels_last, expected, rtol=0, atol=1e-5)


def test_whole_image_flip_averages_the_mirror_pass():
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=4).eval()
    image = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        expected = (model(image).softmax(1) + model(image.flip(-1)).softmax(1).flip(-1)) / 2
        got = predict_probabilities(model, image, InferenceConfig(flip=True))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [({"mode": "tiles"}, "--mode"), ({"scales": (0.5, -1.0)}, "--scales"),
                                            ({"crop_size": 0}, "--crop-size"), ({"stride": 600}, "--stride")])
def test_bad_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InferenceConfig(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_probabilities_in_place_equal_the_plain_softmax(dtype):
    """The channels_last softmax written over the logits equals the out-of-place one bit for bit, and the plain
    softmax over classes to rounding; the caller's logits are left alone unless it hands them over."""
    logits = (torch.randn(2, 7, 5, 6) * 10).to(dtype)
    expected = logits.float().softmax(dim=1)
    channels_last = logits.contiguous(memory_format=torch.channels_last)
    kept = channels_last.clone()
    out_of_place = class_probabilities(channels_last)
    assert torch.equal(channels_last, kept)  # not handed over: untouched
    torch.testing.assert_close(out_of_place, expected, rtol=0, atol=1e-6)
    in_place = class_probabilities(channels_last, overwrite=True)
    assert torch.equal(in_place, out_of_place) and in_place.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(class_probabilities(logits), expected)  # NCHW
