"""Class weights: median frequency balancing from the train masks (cached), and weight files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from seg.data import DataError, build_dataset
from seg.data.class_weights import (automatic_class_weights, median_frequency_weights, pixel_statistics,
                                    read_class_weights, resolve_class_weights)


def test_median_frequency_by_hand():
    # class 0: 80 of 100 pixels in 1 image; class 1: 10 of 200 (2 images); class 2: 5 of 100; class 3 absent.
    weights = median_frequency_weights([80, 10, 5, 0], [100, 200, 100, 0])
    assert weights == pytest.approx([0.05 / 0.8, 0.05 / 0.05, 0.05 / 0.05, 1.0])


def _folder_dataset(root, masks):
    """A folder dataset (images/train, masks/train, classes.txt) holding ``masks`` beside black images."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    for i, mask in enumerate(masks):
        Image.fromarray(np.zeros((*mask.shape, 3), np.uint8)).save(root / "images" / "train" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / "train" / f"{i}.png")
    return build_dataset("folder", "train", root=root)


def test_statistics_skip_ignore_and_cache_follows_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SEG_CACHE_DIR", str(tmp_path / "cache"))
    first = np.zeros((4, 5), np.uint8)
    first[0] = 255
    first[1, :2] = 2
    second = np.ones((4, 5), np.uint8)
    dataset = _folder_dataset(tmp_path / "data", [first, second])
    class_pixels, image_pixels = pixel_statistics(dataset)
    assert class_pixels.tolist() == [13, 20, 2]
    assert image_pixels.tolist() == [15, 20, 15]  # ignore pixels are no image's pixels
    weights, source = automatic_class_weights(dataset)
    assert "cached" in source and weights == pytest.approx(median_frequency_weights(class_pixels, image_pixels))
    cached = list((tmp_path / "cache" / "class_weights").glob("*.json"))
    assert len(cached) == 1
    again, source = automatic_class_weights(dataset)
    assert source == str(cached[0]) and again == weights
    # A changed mask is a new set of files: recomputed, not served stale.
    Image.fromarray(np.full((4, 5), 2, np.uint8)).save(dataset.samples[1].mask)
    changed, source = automatic_class_weights(dataset)
    assert "computed" in source and changed != weights


def test_camvid_thin_classes_weigh_more_than_road_and_sky(shared):
    dataset = build_dataset("camvid", "train", root=shared("data", "camvid"))
    class_pixels, image_pixels = pixel_statistics(dataset)
    weights = dict(zip(dataset.classes, median_frequency_weights(class_pixels, image_pixels)))
    for thin in ("Pole", "SignSymbol", "Pedestrian", "Bicyclist"):
        assert weights[thin] > 2 > 1 > weights["Road"] and weights[thin] > weights["Sky"]


@pytest.mark.parametrize("text,fmt", [("[1, 2.5, 0]", "json"), ('{"b": 2.5, "a": 1, "c": 0}', "json"),
                                      ("1\n2.5\n0\n", "txt")])
def test_weight_files(tmp_path, text, fmt):
    path = tmp_path / f"w.{fmt}"
    path.write_text(text)
    assert read_class_weights(path, ["a", "b", "c"]) == [1.0, 2.5, 0.0]


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "expected 3 weights"),
    ('{"a": 1, "b": 2, "x": 3}', "unknown ['x']"),
    ("[1, -2, 3]", "finite, >= 0"),
    ("[0, 0, 0]", "not all 0"),
    ("one two three", "expected JSON or whitespace-separated numbers"),
])
def test_bad_weight_files_are_named(tmp_path, text, message):
    path = tmp_path / "weights.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(message)) as error:
        read_class_weights(path, ["a", "b", "c"])
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_and_none(tmp_path):
    dataset = build_dataset("toy", "train")
    assert resolve_class_weights(None, dataset) == (None, "none")
    with pytest.raises(DataError, match="not found"):
        resolve_class_weights(str(tmp_path / "absent.json"), dataset)
    weights, _ = resolve_class_weights(str(_write(tmp_path / "w.json", [1] * dataset.num_classes)), dataset)
    assert weights == [1.0] * dataset.num_classes


def _write(path, data):
    path.write_text(json.dumps(data))
    return path
