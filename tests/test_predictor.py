"""``from seg import Segmenter`` and ``python -m seg.predict``: any image input in, a mask at its size out."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from seg import Segmenter
from seg.data import build_dataset


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
    (inputs / "broken.png").write_bytes(b"not an image")
    result = subprocess.run([sys.executable, "-m", "seg.predict", str(inputs), "--checkpoint",
                             str(output / "best.pth"), "--out", str(tmp_path / "out"), "--overlay", "--proba"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert "wrote 2 mask(s)" in result.stdout
    mask = Image.open(tmp_path / "out" / "img0.png")
    assert mask.mode == "P" and mask.size == (128, 128)
    assert np.load(tmp_path / "out" / "img1_proba.npy").shape == (4, 128, 128)
    assert (tmp_path / "out" / "img1_overlay.png").is_file()
