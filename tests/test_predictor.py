"""``from seg import Segmenter`` and ``python -m seg.predict``: any image input in, a mask at its size out.

Predictions are judged on the discriminating fixture model (tests/discriminating_model.py: several confident
classes per image, dependent on colour, intensity scale, position and scale) against a reference written out in
that module: the plain float32 model with the normalisation spelled out. Segmenters run in fp32, so their
probabilities match the reference to float rounding; bf16 is judged in tests/engine/test_precision.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import seg.predictor
from png_files import blank_png
from discriminating_model import (CLASSES, PALETTE_ARRAY, assert_mask_matches, normalise, reference_model,
                                  reference_probabilities)
from seg import Segmenter
from seg.data import build_dataset
from seg.data.io import ImageTooLargeError
from seg.card import ModelCard
from seg.engine.inference import window_starts
from seg.predictor import NATIVE, banded_argmax, tile_spans

# |segmenter - reference| in probability: batch norm folded, channels_last and another summation order; measured
# differences are up to 2e-5, a fifth of this, and any real fault moves probabilities by tenths.
PROBABILITY_TOLERANCE = 1e-4


def context_model(classes: int = 3) -> torch.nn.Module:
    """A tiny fully convolutional model whose outputs depend on their neighbourhood (and on zero padding at
    window borders), so a window in the wrong place changes the result."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, classes, 5, padding=2)).eval()


def card_of(classes: int, **fields) -> ModelCard:
    """A card for a stand-in model with ``classes`` classes, normalisation mean 0.5 and std 0.25."""
    return ModelCard(segmentor="deeplabv3", backbone="resnest14", num_classes=classes,
                     classes=[f"class{i}" for i in range(classes)], palette=[(0, 0, 0)] * classes,
                     mean=(0.5,) * 3, std=(0.25,) * 3, **fields)


def toy_image(index: int) -> np.ndarray:
    """Toy val scene ``index``: (128, 128, 3) uint8 RGB."""
    return build_dataset("toy", "val").load(index)["image"]


def assert_probabilities_match(actual: np.ndarray, expected: np.ndarray, label: str = "") -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape, (label, actual.dtype, actual.shape)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PROBABILITY_TOLERANCE, err_msg=label)


@pytest.fixture(scope="module")
def segmenter(discriminating_checkpoint):
    return Segmenter.from_checkpoint(discriminating_checkpoint, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def reference(discriminating_checkpoint):
    """The checkpoint's model as plain float32 eval PyTorch (tests/discriminating_model.py)."""
    return reference_model(discriminating_checkpoint)


def test_every_input_kind_gives_the_reference_mask(segmenter, reference, tmp_path):
    image = toy_image(0)
    expected = reference_probabilities(reference, image)
    assert_probabilities_match(segmenter.predict_proba(image), expected, "uint8 RGB array")
    mask = segmenter.predict(image)
    assert mask.dtype == np.uint8
    assert_mask_matches(mask, expected, "uint8 RGB array")
    assert len(np.unique(mask)) >= 3  # the comparisons below are between varied masks
    path = tmp_path / "scene.png"  # lossless: the file decodes to the array's pixels
    Image.fromarray(image).save(path)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 77, np.uint8)], axis=2)
    colour_inputs = {
        "str path": str(path), "Path": path, "PIL RGB": Image.fromarray(image),
        "PIL RGBA": Image.fromarray(rgba), "uint8 RGBA array": rgba,
        "uint8 (3, H, W) tensor": torch.from_numpy(image).permute(2, 0, 1),
        "float32 array in [0, 1]": image.astype(np.float32) / 255.0,
        "float64 array in [0, 1]": image / 255.0,
        "float (3, H, W) tensor in [0, 1]": torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
        "non-contiguous view": np.ascontiguousarray(image[:, ::-1])[:, ::-1],
    }
    for label, value in colour_inputs.items():
        # The same pixels reach the network whatever the container: the same mask, bit for bit.
        assert np.array_equal(segmenter.predict(value), mask), label
        assert_probabilities_match(segmenter.predict_proba(value), expected, label)
    # An array is taken as RGB, never guessed to be BGR: swapped channels are another picture, predicted as such.
    bgr = np.ascontiguousarray(image[..., ::-1])
    assert_mask_matches(segmenter.predict(bgr), reference_probabilities(reference, bgr), "BGR array")
    gray = image[..., 1]
    gray_expected = reference_probabilities(reference, np.repeat(gray[..., None], 3, axis=2))
    gray_inputs = {"(H, W) uint8": gray, "(H, W, 1) uint8": gray[..., None], "PIL L": Image.fromarray(gray),
                   "(H, W) tensor": torch.from_numpy(gray), "(H, W) float in [0, 1]": gray / 255.0}
    for label, value in gray_inputs.items():
        assert_probabilities_match(segmenter.predict_proba(value), gray_expected, label)
    assert segmenter.classes == CLASSES


def ms_reference(model, rgb: np.ndarray, scales, base_size: int, crop: int) -> np.ndarray:
    """Multi-scale + flip where every scaled view fits in one window, written out: resize so the long side is
    ceil(base_size x scale), pad bottom/right to the crop with zeros (the mean colour), average the softmax of
    the view and the flipped-back softmax of its mirror, crop, resize back, average over scales."""
    height, width = rgb.shape[:2]
    image = normalise(rgb)
    total = torch.zeros(1, model.num_classes, height, width)
    with torch.no_grad():
        for scale in scales:
            factor = np.ceil(base_size * scale) / max(height, width)
            size = (int(height * factor + 0.5), int(width * factor + 0.5))
            assert max(size) <= crop, "the view must fit one window for this reference"
            view = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
            padded = F.pad(view, (0, crop - size[1], 0, crop - size[0]))
            both = (model(padded).softmax(1) + model(padded.flip(-1)).softmax(1).flip(-1)) / 2
            total += F.interpolate(both[:, :, : size[0], : size[1]], size=(height, width), mode="bilinear",
                                   align_corners=True)
    return (total / len(scales))[0].numpy()


def base_size_reference(model, rgb: np.ndarray, base_size: int) -> np.ndarray:
    """Single-scale prediction at the training scale written out: resize so the long side is base_size, softmax,
    resize the probabilities back to the image."""
    height, width = rgb.shape[:2]
    factor = base_size / max(height, width)
    size = (int(height * factor + 0.5), int(width * factor + 0.5))
    with torch.no_grad():
        view = F.interpolate(normalise(rgb), size=size, mode="bilinear", align_corners=True)
        probabilities = model(view).softmax(1)
        return F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=True)[0].numpy()


def test_images_are_predicted_at_the_training_base_size_unless_asked_otherwise(segmenter, reference):
    """The default is seg.eval's: the long side resized to the card's base size (128), predicted whole, the
    probabilities resized back; base_size=NATIVE keeps the image's own size."""
    image = toy_image(1)[:70, :90]
    at_base = base_size_reference(reference, image, 128)
    native = reference_probabilities(reference, image)
    assert (at_base.argmax(0) != native.argmax(0)).mean() > 0.02  # the two settings are told apart
    assert_probabilities_match(segmenter.predict_proba(image), at_base, "default: the base size")
    assert_mask_matches(segmenter.predict(image), at_base, "default: the base size")
    assert_probabilities_match(segmenter.predict_proba(image, base_size=NATIVE), native, "NATIVE")
    assert_probabilities_match(segmenter.predict_proba(image, base_size=64), base_size_reference(reference, image, 64),
                               "base_size 64")
    config = segmenter.inference_config(scales=(1.0, 1.5))
    assert (config.base_size, config.scales, config.flip, config.mode) == (128, (1.0, 1.5), False, "whole")


def test_probabilities_batches_and_pictures(segmenter, reference):
    images = [toy_image(i)[: 40 + 7 * i, : 50 + 3 * i] for i in range(3)]
    expected = [reference_probabilities(reference, image) for image in images]
    probabilities = segmenter.predict_proba(images[0], base_size=NATIVE)
    assert_probabilities_match(probabilities, expected[0])
    assert np.allclose(probabilities.sum(0), 1, atol=1e-5)
    masks = segmenter.predict_batch(images, base_size=NATIVE)
    assert [m.shape for m in masks] == [(40, 50), (47, 53), (54, 56)]
    for index, (mask, reference_probability) in enumerate(zip(masks, expected)):
        assert_mask_matches(mask, reference_probability, f"batch image {index}")
    assert np.array_equal(masks[0], probabilities.argmax(0))
    # Multi-scale + flip, at scales where each view fits one training crop (96) of the long side 128 x scale.
    assert (segmenter.crop_size, segmenter.base_size) == (96, 128)
    ms_expected = ms_reference(reference, images[1], (0.5, 0.75), 128, 96)
    assert_probabilities_match(segmenter.predict_proba(images[1], ms_flip=True, scales=(0.5, 0.75)), ms_expected)
    ms = segmenter.predict(images[1], ms_flip=True, scales=(0.5, 0.75))
    assert_mask_matches(ms, ms_expected, "multi-scale + flip")
    assert (ms != masks[1]).mean() > 0.02  # the views changed the answer: they were not skipped
    assert np.array_equal(np.asarray(segmenter.colorize(masks[0])), PALETTE_ARRAY[masks[0]])
    overlay = np.asarray(segmenter.overlay(images[0], masks[0]), np.float32)
    blend = 0.5 * images[0].astype(np.float32) + 0.5 * PALETTE_ARRAY[masks[0]]
    assert overlay.shape == blend.shape and np.abs(overlay - blend).max() <= 1


def test_same_size_images_are_batched_into_one_pass_with_the_masks_of_one_at_a_time(segmenter, monkeypatch):
    import seg.predictor as predictor

    images = [toy_image(i) for i in range(5)] + [toy_image(5)[:100, :90]]  # five of one size, one of another
    alone = [segmenter.predict(image) for image in images]
    alone_ms = [segmenter.predict(image, ms_flip=True) for image in images[:3]]
    batch_sizes = []
    forward = predictor.predict_probabilities

    def recording(model, batch, config):
        batch_sizes.append(batch.shape[0])
        return forward(model, batch, config)

    monkeypatch.setattr(predictor, "predict_probabilities", recording)
    together = segmenter.predict_batch(images)
    assert sorted(batch_sizes) == [1, 5]
    for index, (expected, got) in enumerate(zip(alone, together)):
        assert got.dtype == expected.dtype and np.array_equal(got, expected), f"image {index}"
    assert all(np.array_equal(a, b) for a, b in zip(alone_ms, segmenter.predict_batch(images[:3], ms_flip=True)))
    # A pass holds at most max_whole_pixels pixels: two 128 x 128 images per pass here.
    batch_sizes.clear()
    monkeypatch.setattr(segmenter, "max_whole_pixels", 2 * 128 * 128)
    assert all(np.array_equal(a, b) for a, b in zip(alone[:5], segmenter.predict_batch(images[:5])))
    assert batch_sizes == [2, 2, 1]


def test_threads_predicting_different_images_each_get_their_own_answer(segmenter, reference, monkeypatch):
    """One Segmenter, four threads, four different images of one size (so a buffer or cache shared between calls
    would be reused), each predicting its image twice; every answer is its own image's.

    Every network pass waits until all threads have prepared their inputs, so state that one call keeps from its
    preprocessing to its network pass (an input buffer on the Segmenter) is overwritten every time, not by chance.
    """
    images = [toy_image(i) for i in range(4)]
    expected = [reference_probabilities(reference, image) for image in images]
    masks = [probabilities.argmax(0) for probabilities in expected]
    assert all((masks[i] != masks[j]).mean() > 0.1 for i in range(4) for j in range(i))  # different answers
    results = {}
    start = threading.Barrier(len(images))
    inputs_ready = threading.Barrier(len(images))
    original = seg.predictor.predict_probabilities

    def after_every_thread_prepared_its_input(model, batch, config):
        try:
            inputs_ready.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass  # a Segmenter that serialises its calls (a lock) never lets the threads meet here: go on
        return original(model, batch, config)

    monkeypatch.setattr(seg.predictor, "predict_probabilities", after_every_thread_prepared_its_input)

    def work(slot):
        start.wait()
        for round_ in range(2):
            results[slot, round_] = segmenter.predict_proba(images[slot]), segmenter.predict(images[slot])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 2 * len(images)
    for (slot, round_), (probabilities, mask) in sorted(results.items()):
        label = f"thread {slot}, call {round_}"
        assert_probabilities_match(probabilities, expected[slot], label)
        assert_mask_matches(mask, expected[slot], label)


def test_predict_cli_writes_masks_and_reports_bad_inputs(discriminating_checkpoint, reference, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = {"img0.jpg": toy_image(0), "img1.png": toy_image(1), "café_日本.png": toy_image(2)}
    for name, image in images.items():  # a non-ASCII name, end to end
        Image.fromarray(image).save(inputs / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    (inputs / "broken.png").write_bytes(b"not an image")
    blank_png(inputs / "bomb.png", 20000, 20000)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "seg.predict", str(inputs), "--checkpoint",
                             str(discriminating_checkpoint), "--out", str(tmp_path / "out"), "--overlay", "--proba",
                             "--precision", "fp32", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert f"{inputs / 'bomb.png'}: image is 20000x20000 (400.0 megapixels), above the limit of 100 megapixels" \
        in result.stderr
    assert time.perf_counter() - started < 120
    assert "wrote 3 mask(s)" in result.stdout
    assert not (tmp_path / "out" / "bomb.png").exists()
    for name, image in images.items():
        stem = name.rsplit(".", 1)[0]
        # The JPEG's pixels as decoded by Pillow (libjpeg-turbo, like OpenCV): the network's input.
        decoded = np.asarray(Image.open(inputs / name).convert("RGB"))
        expected = reference_probabilities(reference, decoded)
        mask = Image.open(tmp_path / "out" / f"{stem}.png")
        assert mask.mode == "P" and mask.size == (128, 128)
        assert_mask_matches(np.asarray(mask), expected, name)
        assert_probabilities_match(np.load(tmp_path / "out" / f"{stem}_proba.npy"), expected, name)
        overlay = np.asarray(Image.open(tmp_path / "out" / f"{stem}_overlay.png"), np.float32)
        blend = 0.5 * decoded.astype(np.float32) + 0.5 * PALETTE_ARRAY[np.asarray(mask)]
        assert np.abs(overlay - blend).max() <= 1, name


def test_blank_png_is_a_valid_image(tmp_path):
    image = Image.open(blank_png(tmp_path / "b.png", 37, 2100))
    assert image.size == (37, 2100) and image.mode == "1"
    assert not np.asarray(image).any()


@pytest.mark.parametrize("crop,stride", [(5, 3), (16, 10), (48, 32), (48, 48), (7, 1)])
def test_tile_spans_reproduce_the_windows_of_one_slide_pass(crop, stride):
    for length in list(range(1, 130)) + [997, 1000]:
        everywhere = window_starts(length, crop, stride)
        spans = tile_spans(length, crop, stride, windows_per_tile=2)
        assert spans[0][2] == 0 and spans[-1][3] == length
        assert all(end == next_start for (*_, end), (_, _, next_start, _) in zip(spans, spans[1:]))
        for start, end, out_start, out_end in spans:
            assert start <= out_start < out_end <= end
            local = [start + offset for offset in window_starts(end - start, crop, stride)]
            assert set(local) <= set(everywhere)  # every window of a tile is one of the whole pass's
            for position in (out_start, (out_start + out_end) // 2, out_end - 1):
                covering = {w for w in everywhere if w <= position < w + crop}
                assert covering <= set(local), (length, position)  # and all windows over its outputs


def slide_reference(model, rgb: np.ndarray, crop: int, stride: int) -> np.ndarray:
    """One slide pass written out (the image larger than a crop both ways, so no padding): the softmax of every
    ``crop`` window on the stride grid with the last window flush with the border, averaged where they overlap."""
    image = normalise(rgb)
    height, width = rgb.shape[:2]
    total = torch.zeros(1, model.num_classes, height, width)
    counts = torch.zeros(1, 1, height, width)
    with torch.no_grad():
        for y in window_starts(height, crop, stride):
            for x in window_starts(width, crop, stride):
                total[..., y : y + crop, x : x + crop] += model(image[..., y : y + crop, x : x + crop]).softmax(1)
                counts[..., y : y + crop, x : x + crop] += 1
    return (total / counts)[0].numpy()


def test_large_images_slide_tile_by_tile_and_equal_one_slide_pass(discriminating_checkpoint, reference,
                                                                   monkeypatch):
    crop = 32
    segmenter = Segmenter.from_pretrained(discriminating_checkpoint, device="cpu", crop_size=crop,
                                          base_size=NATIVE, max_whole_pixels=64 * 64, precision="fp32")
    image = np.asarray(Image.fromarray(toy_image(3)).resize((157, 131), Image.BILINEAR))
    tiles = []
    original = seg.predictor.predict_probabilities

    def recording(model, batch, config):
        tiles.append((tuple(batch.shape[2:]), config.mode))
        return original(model, batch, config)

    monkeypatch.setattr(seg.predictor, "predict_probabilities", recording)
    probabilities, mask = segmenter.predict_proba(image), segmenter.predict(image)
    # 131 x 157 > 64 x 64: slide, in tiles of at most 3 crops (4 windows at the 2/3-crop stride) a side.
    assert len(tiles) > 2 and all(mode == "slide" and max(size) <= 3 * crop for size, mode in tiles)
    expected = slide_reference(reference, image, crop, stride=2 * crop // 3)  # the documented default stride
    assert_probabilities_match(probabilities, expected, "tiled slide")
    assert_mask_matches(mask, expected, "tiled slide")
    assert len(np.unique(mask)) >= 3
    tiles.clear()
    small = image[:60, :60]
    assert_probabilities_match(segmenter.predict_proba(small), reference_probabilities(reference, small), "whole")
    assert tiles == [((60, 60), "whole")]  # up to max_whole_pixels: one whole-image pass, as before


def test_images_above_max_pixels_are_refused_from_their_header(tmp_path):
    big = blank_png(tmp_path / "big.png", 20000, 20000)
    segmenter = Segmenter(context_model(), card_of(3), device="cpu", max_pixels=10_000_000)
    limit = "above the limit of 10 megapixels"
    with pytest.raises(ImageTooLargeError, match=f"big.png: image is 20000x20000 .*{limit}"):
        segmenter.predict(big)
    # A PIL image is judged by its size, before it is decoded (opening 20000 x 20000 is refused by Pillow itself).
    with Image.open(blank_png(tmp_path / "large.png", 5000, 5000)) as lazy:
        with pytest.raises(ImageTooLargeError, match=f"large.png: image is 5000x5000 .*{limit}"):
            segmenter.predict(lazy)
    view = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20000, 20000, 3))  # no memory behind it
    with pytest.raises(ImageTooLargeError, match=f"image is 20000x20000 .*{limit}"):
        segmenter.predict(view)
    assert segmenter.predict(np.zeros((40, 30, 3), np.uint8)).shape == (40, 30)


def test_a_decompression_bomb_costs_no_memory(tmp_path):
    """In a fresh process (clean peak-memory accounting): the 20000 x 20000 PNG is refused in well under a second
    and the peak resident memory grows by less than 50 MB (decoding it would take 1.2 GB)."""
    big = blank_png(tmp_path / "big.png", 20000, 20000)
    script = f"""
import json, resource, time
import numpy as np, torch
from seg.card import ModelCard
from seg.predictor import Segmenter
from seg.data.io import ImageTooLargeError
model = torch.nn.Conv2d(3, 2, 1)
card = ModelCard(segmentor="deeplabv3", backbone="resnest14", num_classes=2, classes=["a", "b"],
                 palette=[(0, 0, 0)] * 2)
segmenter = Segmenter(model, card, device="cpu")
segmenter.predict(np.zeros((64, 64, 3), np.uint8))  # warm up the allocator and the kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    segmenter.predict({str(big)!r})
    message = None
except ImageTooLargeError as error:
    message = str(error)
print(json.dumps({{"seconds": time.perf_counter() - started, "message": message,
                  "growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["message"] and "20000x20000 (400.0 megapixels), above the limit of 100 megapixels" in \
        measured["message"]
    assert measured["growth_kb"] < 50_000, measured
    assert measured["seconds"] < 1.0, measured


def test_banded_argmax_is_the_argmax_of_one_bilinear_resize():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(5, 9, 13, generator=generator).softmax(0)
    full = F.interpolate(probabilities[None], size=(61, 47), mode="bilinear", align_corners=True)[0].numpy()
    decided = np.sort(full, axis=0)[-1] - np.sort(full, axis=0)[-2] >= 1e-5
    assert decided.mean() > 0.99
    masks = [banded_argmax(probabilities, (61, 47), max_band_pixels=band) for band in (1, 47 * 7, 10**9)]
    assert all(np.array_equal(mask, masks[0]) for mask in masks[1:])  # band size changes nothing, bit for bit
    assert np.array_equal(masks[0][decided], full.argmax(0)[decided])
    assert banded_argmax(probabilities[:, :1, :1], (3, 4), 5).shape == (3, 4)  # a 1x1 map: constant


def test_large_images_at_the_base_size_are_reduced_to_ids_band_by_band(discriminating_checkpoint, reference,
                                                                        monkeypatch):
    """Above max_whole_pixels, resized to the base size: the network sees the resized image once, and the
    probabilities go back to the image's size a band of rows at a time, never as one (C, H, W) array."""
    segmenter = Segmenter.from_checkpoint(discriminating_checkpoint, device="cpu", max_whole_pixels=40 * 40,
                                          precision="fp32")
    image = np.asarray(Image.fromarray(toy_image(2)).resize((157, 131), Image.BILINEAR))
    bands = []
    original = seg.predictor.banded_argmax

    def recording(probabilities, size, max_band_pixels):
        bands.append((tuple(probabilities.shape), size, max_band_pixels))
        return original(probabilities, size, max_band_pixels)

    monkeypatch.setattr(seg.predictor, "banded_argmax", recording)
    mask = segmenter.predict(image)
    assert bands == [((len(CLASSES), 107, 128), (131, 157), 40 * 40)]  # the long side 157 -> base size 128
    assert mask.shape == (131, 157) and mask.dtype == np.uint8
    assert_mask_matches(mask, base_size_reference(reference, image, 128), "banded")
