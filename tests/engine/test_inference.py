"""Inference modes: whole, slide, multi-scale + flip; equalities that pin them down exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from seg.engine.inference import InferenceConfig, predict_probabilities, window_starts
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


@pytest.mark.parametrize("kwargs,message", [({"mode": "tiles"}, "--mode"), ({"scales": (0.5, -1.0)}, "--scales"),
                                            ({"crop_size": 0}, "--crop-size"), ({"stride": 600}, "--stride")])
def test_bad_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InferenceConfig(**kwargs)
