"""``from seg import Segmenter`` and ``python -m seg.predict``: any image input in, a mask at its size out."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import seg.predictor
from seg import Segmenter
from seg.data import build_dataset
from seg.data.io import ImageTooLargeError
from seg.engine.inference import InferenceConfig, predict_probabilities, window_starts
from seg.predictor import tile_spans


def blank_png(path, width: int, height: int):
    """A valid 1-bit PNG of ``width x height`` zeros, written in a fraction of a second: 20000 x 20000 is a
    40 kB file that OpenCV would decode to 1.2 GB of RGB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    rows = b"\0" * ((width + 7) // 8 + 1) * 1000  # a filter byte and the packed bits of each row
    idat = b"".join(compressor.compress(rows[: len(rows) // 1000 * min(1000, height - start)])
                    for start in range(0, height, 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def context_model(classes: int = 3) -> torch.nn.Module:
    """A tiny fully convolutional model whose outputs depend on their neighbourhood (and on zero padding at
    window borders), so a window in the wrong place changes the result."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, classes, 5, padding=2)).eval()


@pytest.fixture(scope="module")
def segmenter(tiny_training_run):
    output, _ = tiny_training_run
    return Segmenter.from_checkpoint(output / "best.pth", device="cpu")


def test_every_input_kind_gives_the_same_mask(segmenter, tmp_path):
    image = build_dataset("toy", "val").load(0)["image"]
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    expected = segmenter.predict(image)
    assert expected.shape == image.shape[:2] and expected.dtype == np.uint8
    inputs = [str(path), path, Image.fromarray(image), Image.fromarray(image).convert("RGBA"),
              torch.from_numpy(image).permute(2, 0, 1), image.astype(np.float32) / 255.0]
    for value in inputs:
        assert np.array_equal(segmenter.predict(value), expected), type(value)
    gray = segmenter.predict(image[..., 0])
    assert gray.shape == image.shape[:2]
    assert segmenter.classes == ("background", "disc", "box", "stripe")


def test_probabilities_batches_and_pictures(segmenter):
    dataset = build_dataset("toy", "val")
    images = [dataset.load(i)["image"][: 40 + 7 * i, : 50 + 3 * i] for i in range(3)]
    probabilities = segmenter.predict_proba(images[0])
    assert probabilities.shape == (4, 40, 50) and np.allclose(probabilities.sum(0), 1, atol=1e-5)
    masks = segmenter.predict_batch(images)
    assert [m.shape for m in masks] == [(40, 50), (47, 53), (54, 56)]
    assert np.array_equal(masks[0], probabilities.argmax(0))
    ms = segmenter.predict(images[1], ms_flip=True, scales=(0.75, 1.0))
    assert ms.shape == (47, 53)
    assert segmenter.colorize(masks[0]).size == (50, 40)
    assert segmenter.overlay(images[0], masks[0]).mode == "RGB"


def test_threads_share_one_segmenter(segmenter):
    image = build_dataset("toy", "val").load(1)["image"]
    expected = segmenter.predict(image)
    results = [None] * 4

    def work(slot):
        results[slot] = segmenter.predict(image)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(r, expected) for r in results)


def test_predict_cli_writes_masks_and_reports_bad_inputs(tiny_training_run, tmp_path):
    output, _ = tiny_training_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    dataset = build_dataset("toy", "val")
    for i in range(2):
        Image.fromarray(dataset.load(i)["image"]).save(inputs / f"img{i}.jpg")
    Image.fromarray(dataset.load(2)["image"]).save(inputs / "café_日本.png")  # a non-ASCII name, end to end
    (inputs / "broken.png").write_bytes(b"not an image")
    blank_png(inputs / "bomb.png", 20000, 20000)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "seg.predict", str(inputs), "--checkpoint",
                             str(output / "best.pth"), "--out", str(tmp_path / "out"), "--overlay", "--proba"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert f"{inputs / 'bomb.png'}: image is 20000x20000 (400.0 megapixels), above the limit of 100 megapixels" \
        in result.stderr
    assert time.perf_counter() - started < 120
    assert "wrote 3 mask(s)" in result.stdout
    assert Image.open(tmp_path / "out" / "café_日本.png").size == (128, 128)
    assert (tmp_path / "out" / "café_日本_overlay.png").is_file()
    assert not (tmp_path / "out" / "bomb.png").exists()
    mask = Image.open(tmp_path / "out" / "img0.png")
    assert mask.mode == "P" and mask.size == (128, 128)
    assert np.load(tmp_path / "out" / "img1_proba.npy").shape == (4, 128, 128)
    assert (tmp_path / "out" / "img1_overlay.png").is_file()


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


def test_large_images_slide_tile_by_tile_and_equal_one_slide_pass(monkeypatch):
    model = context_model()
    segmenter = Segmenter(model, ["a", "b", "c"], np.zeros((3, 3), np.uint8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                          device="cpu", crop_size=24, max_whole_pixels=64 * 64)
    image = np.random.default_rng(0).integers(0, 256, (131, 157, 3), dtype=np.uint8)
    tiles = []
    original = seg.predictor.predict_probabilities

    def recording(model, batch, config):
        tiles.append((tuple(batch.shape[2:]), config.mode))
        return original(model, batch, config)

    monkeypatch.setattr(seg.predictor, "predict_probabilities", recording)
    probabilities, mask = segmenter.predict_proba(image), segmenter.predict(image)
    # 131 x 157 > 64 x 64: slide, in tiles of at most 3 crops (4 windows at the 2/3-crop stride) a side.
    assert len(tiles) > 2 and all(mode == "slide" and max(size) <= 3 * 24 for size, mode in tiles)
    reference = original(segmenter.model, segmenter._tensor(image), InferenceConfig(mode="slide", crop_size=24))[0]
    np.testing.assert_allclose(probabilities, reference.numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(mask, reference.argmax(0).numpy())
    tiles.clear()
    small = image[:60, :60]
    np.testing.assert_allclose(segmenter.predict_proba(small),
                               original(segmenter.model, segmenter._tensor(small), InferenceConfig())[0].numpy())
    assert tiles == [((60, 60), "whole")]  # up to max_whole_pixels: one whole-image pass, as before


def test_images_above_max_pixels_are_refused_from_their_header(tmp_path):
    big = blank_png(tmp_path / "big.png", 20000, 20000)
    segmenter = Segmenter(context_model(), ["a", "b", "c"], np.zeros((3, 3), np.uint8), (0.5,) * 3, (0.25,) * 3,
                          device="cpu", max_pixels=10_000_000)
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
from seg.predictor import Segmenter
from seg.data.io import ImageTooLargeError
model = torch.nn.Conv2d(3, 2, 1)
segmenter = Segmenter(model, ["a", "b"], np.zeros((2, 3), np.uint8), (0.5,) * 3, (0.25,) * 3, device="cpu")
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
