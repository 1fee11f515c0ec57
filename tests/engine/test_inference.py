"""Inference modes: whole, slide, multi-scale + flip; equalities that pin them down exactly."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.config import ConfigError
from seg.engine.inference import (MS_SCALES, NATIVE, InferenceConfig, InferenceOptions, class_probabilities,
                                  predict_probabilities, resolve_inference, window_starts)
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


def mmseg_window_starts(length: int, crop: int, stride: int) -> list:
    """mmsegmentation's slide_inference grid along one axis, as it writes it: ceil((length - crop) / stride) + 1
    windows every ``stride``, each clamped to end inside the axis (a shorter axis is padded to ``crop`` first)."""
    length = max(length, crop)
    grids = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(index * stride + crop, length) - crop, 0) for index in range(grids)]


def encoding_scaled_size(height: int, width: int, scale: float, base_size: int) -> tuple:
    """PyTorch-Encoding's MultiEvalModule resize, as it writes it: the long side ceil(base_size x scale), the
    short side in proportion, rounded half up."""
    long_size = int(math.ceil(base_size * scale))
    if height > width:
        return long_size, int(1.0 * width * long_size / height + 0.5)
    return int(1.0 * height * long_size / width + 0.5), long_size


def test_window_starts_cover_the_axis_with_the_last_window_flush():
    assert window_starts(100, 40, 26) == [0, 26, 52, 60]
    assert window_starts(40, 40, 26) == [0] and window_starts(30, 40, 26) == [0]
    for length, crop, stride in [(1000, 512, 341), (97, 32, 21), (513, 512, 1)]:
        starts = window_starts(length, crop, stride)
        assert starts[-1] + crop == length and all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))
    for length in range(24, 140, 7):
        for crop, stride in [(24, 10), (32, 21), (32, 32), (40, 1)]:
            assert window_starts(length, crop, stride) == mmseg_window_starts(length, crop, stride), (length, crop)


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
    height, width = image.shape[2:]
    result = 0
    for scale in scales:
        size = encoding_scaled_size(height, width, scale, base_size)
        view = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
        padded = F.pad(view, (0, max(crop - size[1], 0), 0, max(crop - size[0], 0)))
        total = torch.zeros(1, model.num_classes, *padded.shape[2:])
        counts = torch.zeros(1, 1, *padded.shape[2:])
        for y in mmseg_window_starts(padded.shape[2], crop, stride):
            for x in mmseg_window_starts(padded.shape[3], crop, stride):
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


class RecordingPointwise(Pointwise):
    """A :class:`Pointwise` classifier that keeps a copy of every batch it is called on (one entry per call)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale)
        self.calls: list = []

    def forward(self, x):
        self.calls.append(x.detach().clone())
        return super().forward(x)


def recording_segmentor() -> tuple:
    """A DeepLabV3 segmentor and the list its backbone's stem appends each batch to (one entry per call)."""
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=4).eval()
    calls: list = []
    model.backbone.conv1.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].detach().clone()))
    return model, calls


def expected_model_inputs(image: torch.Tensor, config: InferenceConfig) -> dict:
    """Every image the model must be given, keyed (scale index, window top, window left, mirrored), from the
    scale list and the window arithmetic alone: each scale's resized view (or its padded windows in slide mode),
    and with flip each one's mirror image."""
    height, width = image.shape[2:]
    inputs = {}
    for index, scale in enumerate(config.scales):
        size = encoding_scaled_size(height, width, scale, config.base_size)
        view = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                    align_corners=True)
        if config.mode == "whole":
            windows = {(0, 0): view}
        else:
            crop, stride = config.crop_size, config.stride
            padded = F.pad(view, (0, max(crop - size[1], 0), 0, max(crop - size[0], 0)))
            windows = {(y, x): padded[:, :, y : y + crop, x : x + crop]
                       for y in mmseg_window_starts(size[0], crop, stride)
                       for x in mmseg_window_starts(size[1], crop, stride)}
        for (y, x), window in windows.items():
            inputs[(index, y, x, False)] = window[0]
            if config.flip:
                inputs[(index, y, x, True)] = window[0].flip(-1)
    return inputs


def identify(batch: torch.Tensor, inputs: dict) -> list:
    """The key in ``inputs`` of each image of ``batch``; each must equal exactly one expected input."""
    keys = []
    for image in batch:
        matches = [key for key, expected in inputs.items()
                   if expected.shape == image.shape and torch.allclose(image, expected, rtol=0, atol=1e-6)]
        assert len(matches) == 1, f"a {tuple(image.shape)} model input matches {len(matches)} expected views"
        keys.append(matches[0])
    return keys


def pointwise_multi_scale(classifier: nn.Module, image: torch.Tensor, scales, base_size: int) -> torch.Tensor:
    """Multi-scale inference of a per-pixel classifier without windows or mirrors: for such a model every window
    and every mirror image flipped back gives each pixel the answer of its scale's whole view."""
    height, width = image.shape[2:]
    total = 0
    for scale in scales:
        size = encoding_scaled_size(height, width, scale, base_size)
        view = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                    align_corners=True)
        probabilities = classifier(view).softmax(1)
        if size != (height, width):
            probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=True)
        total = total + probabilities
    return total / len(scales)


@pytest.mark.parametrize("model_kind", ["pointwise", "segmentor"])
@pytest.mark.parametrize("mode,flip", [("whole", True), ("slide", True), ("slide", False)])
def test_multi_scale_flip_runs_every_scale_window_and_mirror_exactly_once(model_kind, mode, flip):
    """Counted at the model's input: scales x windows x {plain, mirrored}, each image once, a window batched with
    its mirror image, no pass over window_batch images. The ADE20K scales at a 40x56 image, base 56 and crop 32
    give views from 20x28 (one padded window) to 70x98 (15 windows)."""
    image = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    config = InferenceConfig(mode=mode, crop_size=32, stride=20, scales=MS_SCALES["ade20k"], flip=flip,
                             base_size=56, window_batch=4)
    if model_kind == "pointwise":
        model = RecordingPointwise(scale=4.0)  # confident: a mirror left unflipped moves the probabilities
        calls = model.calls
    else:
        model, calls = recording_segmentor()
    got = predict_probabilities(model, image, config)

    expected = expected_model_inputs(image, config)
    seen = [identify(batch, expected) for batch in calls]
    assert Counter(key for call in seen for key in call) == Counter(expected.keys())
    assert {key[3] for key in expected} == ({False, True} if flip else {False})
    views = 2 if flip else 1
    for call in seen:
        assert len(call) <= config.window_batch
        assert set(Counter(key[:3] for key in call).values()) == {views}  # each window with its mirror image
    windows_per_scale = Counter(key[0] for key in expected if not key[3])
    assert sorted(windows_per_scale) == list(range(len(MS_SCALES["ade20k"])))
    windows_per_pass = config.window_batch // views
    assert len(calls) == sum(1 if mode == "whole" else math.ceil(count / windows_per_pass)
                             for count in windows_per_scale.values())
    if model_kind == "pointwise":  # the mirrors' probabilities were flipped back before averaging
        with torch.no_grad():
            reference = pointwise_multi_scale(Pointwise(scale=4.0), image, config.scales, config.base_size)
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)


def test_multi_scale_scales_are_the_published_ones():
    """README: ADE20K 0.5-1.75 and Cityscapes 0.75-2.25, in PyTorch-Encoding's steps of 0.25."""
    def quarter_steps(first: float, last: float) -> tuple:
        return tuple(first + 0.25 * step for step in range(round((last - first) / 0.25) + 1))

    assert MS_SCALES["ade20k"] == quarter_steps(0.5, 1.75)
    assert MS_SCALES["cityscapes"] == quarter_steps(0.75, 2.25)


def test_whole_image_flip_averages_the_mirror_pass():
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=4).eval()
    image = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        expected = (model(image).softmax(1) + model(image.flip(-1)).softmax(1).flip(-1)) / 2
        got = predict_probabilities(model, image, InferenceConfig(flip=True))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,setting", [({"mode": "tiles"}, "mode"), ({"scales": (0.5, -1.0)}, "scales"),
                                            ({"crop_size": 0}, "crop_size"), ({"stride": 600}, "stride"),
                                            ({"window_batch": 0}, "window_batch")])
def test_bad_settings_name_the_setting_not_a_flag(kwargs, setting):
    """The library names the setting; each CLI words it with its own flag (seg.cli.flag_message)."""
    with pytest.raises(ConfigError) as raised:
        InferenceConfig(**kwargs)
    assert raised.value.setting == setting and str(raised.value).startswith(f"{setting} must be")
    assert "--" not in str(raised.value)


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


def card_with(**fields):
    from seg.card import ModelCard

    return ModelCard(segmentor="deeplabv3", backbone="resnest14", num_classes=2, classes=["a", "b"],
                     palette=[(0, 0, 0), (255, 255, 255)], **fields)


def test_resolve_inference_takes_each_default_from_the_card():
    card = card_with(crop_size=96, base_size=128, test_scales=(0.5, 1.0, 2.0))
    assert resolve_inference(card) == InferenceConfig(mode="whole", crop_size=96, scales=(1.0,), base_size=128)
    assert resolve_inference(card, InferenceOptions(ms_flip=True)) == InferenceConfig(
        mode="slide", crop_size=96, scales=(0.5, 1.0, 2.0), flip=True, base_size=128)
    # Scales without ms_flip multiply the base size too; NATIVE keeps the image's size; each option overrides.
    assert resolve_inference(card, InferenceOptions(scales=(1.0, 1.5))).base_size == 128
    assert resolve_inference(card, InferenceOptions(base_size=NATIVE)).base_size is None
    chosen = resolve_inference(card, InferenceOptions(ms_flip=True, mode="whole", crop_size=64, stride=32,
                                                      base_size=200, scales=(1.0,), window_batch=2))
    assert chosen == InferenceConfig(mode="whole", crop_size=64, stride=32, scales=(1.0,), flip=True, base_size=200,
                                     window_batch=2)
    assert resolve_inference(card_with(base_size=None)).base_size is None  # a card without one: own size


@pytest.mark.parametrize("flags,options", [
    ([], {}),
    (["--ms-flip"], {"ms_flip": True}),
    (["--scales", "1.0,1.25"], {"scales": (1.0, 1.25)}),
    (["--scales", "0.5,1.0", "--flip", "--mode", "slide"], {"scales": (0.5, 1.0), "flip": True, "mode": "slide"}),
    (["--ms-flip", "--crop-size", "48", "--stride", "30"], {"ms_flip": True, "crop_size": 48, "stride": 30}),
    (["--base-size", "0"], {"base_size": NATIVE}),
    (["--base-size", "200", "--ms-flip"], {"base_size": 200, "ms_flip": True}),
])
def test_seg_eval_and_segmenter_mean_the_same_by_each_option(flags, options):
    """The same option through seg.eval's flags and Segmenter's keyword arguments resolves to one config."""
    import seg.eval as seg_eval
    from seg import Segmenter

    card = card_with(crop_size=96, base_size=128, test_scales=(0.75, 1.0))
    segmenter = Segmenter(nn.Conv2d(3, 2, 1), card, device="cpu", precision="fp32")
    args = seg_eval.parser().parse_args(flags)
    assert resolve_inference(card, seg_eval.inference_options(args)) == segmenter.inference_config(**options)
