"""Image and mask decoding: every common encoding becomes 8-bit RGB / class indices; bad files name themselves."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from seg.data import DataError, read_image, read_mask
from seg.data.io import ImageTooLargeError, quiet_opencv

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
        ("café_日本.jpg", lambda: Image.fromarray(RGB), None),
        ("gray-alpha.png", lambda: Image.fromarray(RGB[..., 0]).convert("LA"), np.repeat(RGB[..., :1], 3, 2)),
        ("palette-transparent.png", lambda: transparent_palette(), None),
    ],
)
def test_images_decode_to_8bit_rgb(tmp_path, name, make, expected):
    source = make()
    path = save(tmp_path / name, source)
    image = read_image(path)
    assert image.shape == (40, 56, 3) and image.dtype == np.uint8
    reference = expected if expected is not None else np.asarray(Image.open(path).convert("RGB"))
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1  # CMYK conversion rounds differently


def transparent_palette() -> Image.Image:
    image = Image.fromarray(RGB).quantize(16)
    image.info["transparency"] = 0
    return image


def test_sixteen_bit_colour_images_become_8_bit_rgb(tmp_path):
    sixteen = RGB.astype(np.uint16) * 257  # 0..65535, so 8-bit v is 16-bit v * 257
    path = tmp_path / "sixteen-rgb.png"
    cv2.imwrite(str(path), sixteen[..., ::-1])  # OpenCV writes BGR
    assert np.array_equal(read_image(path), RGB)


def test_exif_orientation_is_honoured(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(RGB).save(path, exif=exif, quality=95)
    assert read_image(path).shape == (56, 40, 3)


@pytest.mark.parametrize("suffix,encoder", [("jpg", "JPEG"), ("png", "PNG")])
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "header-only"])
def test_broken_images_are_named(tmp_path, damage, suffix, encoder):
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, encoder)
    encoded = buffer.getvalue()
    data = {"empty": b"", "truncated": encoded[: len(encoded) // 2], "garbage": b"not an image at all",
            "header-only": encoded[:40]}[damage]
    path = tmp_path / f"{damage}.{suffix}"
    path.write_bytes(data)
    with pytest.raises(DataError, match=f"{damage}.{suffix}: "):
        read_image(path)
    with pytest.raises(DataError, match=f"{damage}.{suffix}: "):
        read_mask(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "RGB-gray", "RGBA-gray", "LA", "1"])
def test_masks_keep_class_indices(tmp_path, mode):
    values = RNG.integers(0, 2 if mode == "1" else 20, (30, 30)).astype(np.uint8)
    if mode == "P":
        image = Image.frombytes("P", (30, 30), values.tobytes())
        image.putpalette(list(RNG.integers(0, 256, 768).astype(int)))
    elif mode == "I;16":
        image = Image.fromarray(values.astype(np.uint16))
    elif mode == "RGB-gray":
        image = Image.fromarray(np.repeat(values[..., None], 3, axis=2))
    elif mode == "RGBA-gray":
        image = Image.fromarray(np.dstack([values, values, values, np.full_like(values, 7)]))
    elif mode == "LA":
        image = Image.fromarray(np.dstack([values, np.full_like(values, 9)]), mode="LA")
    elif mode == "1":
        image = Image.fromarray(values.astype(bool))
    else:
        image = Image.fromarray(values)
    path = save(tmp_path / "mask.png", image)
    assert np.array_equal(read_mask(path), values)


def test_sixteen_bit_masks_keep_values_above_255(tmp_path):
    values = np.array([[0, 255, 256], [1000, 65535, 7]], np.uint16)
    path = save(tmp_path / "masque_été.png", Image.fromarray(values))  # and a non-ASCII name
    mask = read_mask(path)
    assert mask.dtype == np.int32 and np.array_equal(mask, values.astype(np.int32))


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_pixel_limit_is_checked_from_the_header(tmp_path, suffix):
    path = save(tmp_path / f"wide.{suffix}", Image.fromarray(RGB[..., 0]))  # 56 x 40 = 2240 pixels
    message = f"wide.{suffix}: image is 56x40 \\(0.0 megapixels\\), above the limit of 0.002 megapixels"
    with pytest.raises(ImageTooLargeError, match=message):
        read_image(path, max_pixels=2000)
    if suffix == "png":
        with pytest.raises(ImageTooLargeError, match=message):
            read_mask(path, max_pixels=2000)
        assert read_mask(path, max_pixels=2240).shape == (40, 56)
    assert read_image(path, max_pixels=2240).shape == (40, 56, 3)
    assert read_image(path, max_pixels=None).shape == (40, 56, 3)


def test_pillows_own_bomb_guard_never_surfaces(tmp_path, monkeypatch):
    """Whatever Pillow's global limit, ours decides: no DecompressionBombError or warning reaches the caller."""
    path = save(tmp_path / "mask.png", Image.fromarray(RGB[..., 0]))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow would now raise above 200 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(path).shape == (40, 56, 3)
        assert np.array_equal(read_mask(path), RGB[..., 0])
        for read in (read_image, read_mask):
            with pytest.raises(ImageTooLargeError, match="mask.png: image is 56x40 .* limit of 0.001 megapixels"):
                read(path, max_pixels=1000)


def test_colour_coded_masks_are_refused(tmp_path):
    path = save(tmp_path / "colour.png", Image.fromarray(RGB))
    with pytest.raises(DataError, match="colour.png: colour mask"):
        read_mask(path)


# The program's own OpenCV settings (deliberately not OpenCV's defaults nor what seg would set), then seg imported
# and used: the settings must still be the program's.
OPENCV_SETTINGS_SCRIPT = r"""
import json, sys
import cv2
cv2.setNumThreads(3)
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_WARNING)
n, level = cv2.getNumThreads(), cv2.utils.logging.getLogLevel()
from seg import Segmenter
import seg.data, seg.data.io, seg.data.loader
after_import = [cv2.getNumThreads(), cv2.utils.logging.getLogLevel()]
shape = list(seg.data.io.read_image(sys.argv[1]).shape)
broken = []
for path in sys.argv[2:]:
    try:
        seg.data.io.read_image(path)
    except seg.data.io.DataError as error:
        broken.append(str(error))
print(json.dumps({"before": [n, level], "after_import": after_import, "shape": shape, "broken": broken,
                  "after_decoding": [cv2.getNumThreads(), cv2.utils.logging.getLogLevel()]}))
"""


def test_importing_and_decoding_leave_the_programs_opencv_settings_alone(tmp_path):
    """``from seg import Segmenter`` must not change OpenCV's thread count or log level for the whole program; the
    decoders quieten OpenCV only while they decode (its warning about a broken file does not reach stderr)."""
    good = save(tmp_path / "good.png", Image.fromarray(RGB))
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, "PNG")
    broken = tmp_path / "header-only.png"
    broken.write_bytes(buffer.getvalue()[:40])  # OpenCV warns "PNG input buffer is incomplete" at WARNING
    text = tmp_path / "notes.png"
    text.write_text("not an image")  # OpenCV 5 logs "imdecode_(''): can't read header" at ERROR
    result = subprocess.run([sys.executable, "-c", OPENCV_SETTINGS_SCRIPT, str(good), str(broken), str(text)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["before"] == [3, cv2.utils.logging.LOG_LEVEL_WARNING]
    assert seen["after_import"] == seen["before"]
    assert seen["after_decoding"] == seen["before"]
    assert seen["shape"] == [40, 56, 3]
    assert len(seen["broken"]) == 2 and "header-only.png: not a readable image" in seen["broken"][0]
    assert "notes.png: not a readable image" in seen["broken"][1]
    assert "WARN" not in result.stderr and "ERROR" not in result.stderr, result.stderr[-2000:]


def test_opencv_is_quiet_until_the_last_concurrent_decode_ends(tmp_path):
    logging = cv2.utils.logging
    saved = logging.getLogLevel()
    try:
        logging.setLogLevel(logging.LOG_LEVEL_INFO)
        with quiet_opencv():
            assert logging.getLogLevel() == logging.LOG_LEVEL_FATAL
            with quiet_opencv():  # a second decode that starts and ends while the first runs
                assert logging.getLogLevel() == logging.LOG_LEVEL_FATAL
            assert logging.getLogLevel() == logging.LOG_LEVEL_FATAL  # the first still decodes: still quiet
        assert logging.getLogLevel() == logging.LOG_LEVEL_INFO
        path = save(tmp_path / "image.png", Image.fromarray(RGB))
        failures = []

        def decode_many():
            try:
                for _ in range(20):
                    assert read_image(path).shape == (40, 56, 3)
            except Exception as error:  # noqa: BLE001 - reported by the main thread
                failures.append(error)

        threads = [threading.Thread(target=decode_many) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures
        assert logging.getLogLevel() == logging.LOG_LEVEL_INFO
    finally:
        logging.setLogLevel(saved)


def _level_and_decode(path, results) -> None:
    results.put((cv2.utils.logging.getLogLevel(), read_image(path).shape))


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="platform: no fork")
def test_a_process_forked_mid_decode_gets_the_programs_level_and_can_decode(tmp_path):
    """A DataLoader worker forked while another thread decodes: no deadlock on the decoders' lock, and the
    worker's OpenCV log level is the program's, not the decoding thread's ERROR."""
    logging = cv2.utils.logging
    saved = logging.getLogLevel()
    path = save(tmp_path / "image.png", Image.fromarray(RGB))
    entered, leave = threading.Event(), threading.Event()

    def decoding():
        with quiet_opencv():
            entered.set()
            leave.wait(60)

    thread = threading.Thread(target=decoding)
    try:
        logging.setLogLevel(logging.LOG_LEVEL_INFO)
        thread.start()
        assert entered.wait(60) and logging.getLogLevel() == logging.LOG_LEVEL_FATAL
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_level_and_decode, args=(path, results))
        child.start()
        level, shape = results.get(timeout=60)
        child.join(60)
        assert (level, shape, child.exitcode) == (logging.LOG_LEVEL_INFO, (40, 56, 3), 0)
    finally:
        leave.set()
        thread.join()
        assert logging.getLogLevel() == logging.LOG_LEVEL_INFO
        logging.setLogLevel(saved)
