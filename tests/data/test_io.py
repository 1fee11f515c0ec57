"""Image and mask decoding: every common encoding becomes 8-bit RGB / class indices; bad files name themselves."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from seg.data import DataError, read_image, read_mask

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)


def save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "name,make,expected",
    [
        ("rgb.png", lambda: Image.fromarray(RGB), RGB),
        ("gray.png", lambda: Image.fromarray(RGB[..., 0]), np.repeat(RGB[..., :1], 3, axis=2)),
        ("rgba.png", lambda: Image.fromarray(np.dstack([RGB, RGB[..., :1]])), RGB),
        ("palette.png", lambda: Image.fromarray(RGB).quantize(64), None),
        ("sixteen.png", lambda: Image.fromarray(RGB[..., 0].astype(np.uint16) * 257), np.repeat(RGB[..., :1], 3, 2)),
        ("cmyk.jpg", lambda: Image.fromarray(RGB).convert("CMYK"), None),
        ("mode-é-ñ.png", lambda: Image.fromarray(RGB), RGB),  # non-ASCII file name
    ],
)
def test_images_decode_to_8bit_rgb(tmp_path, name, make, expected):
    source = make()
    path = save(tmp_path / name, source)
    image = read_image(path)
    assert image.shape == (40, 56, 3) and image.dtype == np.uint8
    reference = expected if expected is not None else np.asarray(Image.open(path).convert("RGB"))
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1  # CMYK conversion rounds differently


def test_exif_orientation_is_honoured(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(RGB).save(path, exif=exif, quality=95)
    assert read_image(path).shape == (56, 40, 3)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_broken_images_are_named(tmp_path, damage):
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, "JPEG")
    data = {"empty": b"", "truncated": buffer.getvalue()[:300], "garbage": b"not an image at all"}[damage]
    path = tmp_path / f"{damage}.jpg"
    path.write_bytes(data)
    with pytest.raises(DataError, match=f"{damage}.jpg: "):
        read_image(path)
    with pytest.raises(DataError, match=f"{damage}.jpg: "):
        read_mask(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "RGB-gray"])
def test_masks_keep_class_indices(tmp_path, mode):
    values = RNG.integers(0, 20, (30, 30)).astype(np.uint8)
    if mode == "P":
        image = Image.frombytes("P", (30, 30), values.tobytes())
        image.putpalette(list(RNG.integers(0, 256, 768).astype(int)))
    elif mode == "I;16":
        image = Image.fromarray(values.astype(np.uint16))
    elif mode == "RGB-gray":
        image = Image.fromarray(np.repeat(values[..., None], 3, axis=2))
    else:
        image = Image.fromarray(values)
    path = save(tmp_path / "mask.png", image)
    assert np.array_equal(read_mask(path), values)


def test_colour_coded_masks_are_refused(tmp_path):
    path = save(tmp_path / "colour.png", Image.fromarray(RGB))
    with pytest.raises(DataError, match="colour.png: colour mask"):
        read_mask(path)
