"""Decoding images and label masks from disk, fast and strictly.

Images go through OpenCV (libjpeg-turbo/libpng; about 1.5x PIL's JPEG rate here), which honours EXIF
orientation and turns grayscale, RGBA, palette, CMYK and 16-bit files into 8-bit RGB. Masks go through PIL,
because a palette PNG's pixels must stay class indices, not be expanded to colours. Anything unreadable raises
:class:`DataError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np
from PIL import Image, ImageOps

cv2.setNumThreads(1)  # DataLoader workers are the parallelism; OpenCV's own threads would oversubscribe the cores
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A data file or folder is missing, unreadable or inconsistent; the message names it and says what was
    expected."""


def _read_bytes(path: PathLike) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    if data.size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    return data


def read_image(path: PathLike) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array, EXIF orientation applied."""
    image = cv2.imdecode(_read_bytes(path), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise DataError(f"{path}: not a readable image (truncated or corrupt, or an unsupported format)")
    return image


def read_mask(path: PathLike) -> np.ndarray:
    """Decode a label mask to an (H, W) integer array of the stored values (uint8, or int32 for 16-bit files).

    Palette PNGs give their indices; an RGB(A) mask is accepted only if its channels are equal (a grey mask saved
    as colour); colour-coded masks must be converted to class indices first.
    """
    _read_bytes(path)  # one clear message for missing and empty files
    try:
        with Image.open(path) as opened:
            opened.load()
            mask_image = ImageOps.exif_transpose(opened)
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable mask ({error})") from None
    mode = mask_image.mode
    if mode in ("P", "L"):
        return np.asarray(mask_image)
    if mode == "1":
        return np.asarray(mask_image, dtype=np.uint8)
    if mode == "LA":
        return np.asarray(mask_image)[..., 0]
    if mode.startswith("I"):
        return np.asarray(mask_image).astype(np.int32)
    if mode in ("RGB", "RGBA"):
        pixels = np.asarray(mask_image)
        if np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2]):
            return np.ascontiguousarray(pixels[..., 0])
        raise DataError(
            f"{path}: colour mask ({mode}) with differing channels; masks must hold class indices "
            f"(single-channel or palette PNG)"
        )
    raise DataError(f"{path}: unsupported mask mode {mode}; expected a single-channel or palette PNG")


def list_files(folder: Path, suffixes: tuple) -> list:
    """Files under ``folder`` (recursively) with one of ``suffixes`` (lower-case), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
