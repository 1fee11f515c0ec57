"""Decoding images and label masks from disk, fast and strictly.

Images go through OpenCV (libjpeg-turbo/libpng; about 1.5x PIL's JPEG rate here), which honours EXIF
orientation and turns grayscale, RGBA, palette, CMYK and 16-bit files into 8-bit RGB. Masks go through PIL,
because a palette PNG's pixels must stay class indices, not be expanded to colours. Anything unreadable raises
:class:`DataError` naming the file.

Decompression bombs: a few kilobytes of PNG can declare 20000 x 20000 pixels, which OpenCV would allocate (1.2 GB
as RGB) before finding anything wrong. Both readers therefore read the size from the file's header first (Pillow
parses headers lazily) and refuse images above ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`) with
:class:`ImageTooLargeError`, before any pixel is decoded.

Importing this module changes no OpenCV setting: the thread limit for the DataLoader workers is set in their
init function (:func:`seg.data.loader.seed_worker`), and OpenCV's log level is raised to ERROR only while seg
decodes (:func:`quiet_opencv`), so that OpenCV's own warnings about an unreadable file do not repeat the
:class:`DataError` that names it.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PathLike = Union[str, os.PathLike]

# The image files seg reads (lower-case suffixes): what a folder dataset lists and what seg.predict accepts.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# 100 megapixels: a 12000 x 8000 photo passes; the pixels alone take 300 MB as uint8 RGB.
DEFAULT_MAX_PIXELS = 100_000_000

# OpenCV's log level is process-wide: the first decode to enter quiet_opencv saves it and sets FATAL, the last one
# to leave restores it, so threads decoding at once never restore it under each other.
_quiet_lock = threading.Lock()
_quiet_users = 0
_saved_log_level: Optional[int] = None


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """OpenCV's log level at FATAL inside the block (what it logs about an unreadable file, at WARNING or, since
    OpenCV 5, at ERROR, repeats the DataError that names it: a service would log every bad upload twice), the
    caller's level again after it. Safe when several threads decode at once."""
    global _quiet_users, _saved_log_level
    with _quiet_lock:
        if _quiet_users == 0:
            _saved_log_level = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                cv2.utils.logging.setLogLevel(_saved_log_level)
                _saved_log_level = None


def _before_fork() -> None:
    _quiet_lock.acquire()


def _after_fork_in_parent() -> None:
    _quiet_lock.release()


def _after_fork_in_child() -> None:
    """A forked process (a DataLoader worker) has none of its parent's decoding threads: give it the program's log
    level back if one was decoding at the fork, and a fresh lock (the parent's is held across the fork)."""
    global _quiet_lock, _quiet_users, _saved_log_level
    if _quiet_users:
        cv2.utils.logging.setLogLevel(_saved_log_level)
    _quiet_lock, _quiet_users, _saved_log_level = threading.Lock(), 0, None


if hasattr(os, "register_at_fork"):  # POSIX: fork with the state consistent (no thread halfway through an update)
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


class DataError(ValueError):
    """A data file or folder is missing, unreadable or inconsistent; the message names it and says what was
    expected."""


class ImageTooLargeError(DataError):
    """An image has more pixels than the caller allows (checked from its header, before decoding)."""


def check_pixel_limit(source: object, width: int, height: int, max_pixels: Optional[int]) -> None:
    """Raise :class:`ImageTooLargeError` naming ``source``, its size and the limit when ``width x height`` exceeds
    ``max_pixels`` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{source}: image is {width}x{height} ({width * height / 1e6:.1f} megapixels), above the limit of "
            f"{max_pixels / 1e6:g} megapixels (max_pixels; raise it for trusted images)"
        )


def _open_past_pillow_guard(data: np.ndarray) -> Optional[Image.Image]:
    """Open (header only) an image that ``Image.open`` refuses as a decompression bomb.

    Runs the opener of the first format plugin that accepts the data, as ``Image.open`` does, minus its bomb
    check: our own limit is what applies. None if no plugin opens it.
    """
    prefix = bytes(data[:16])
    Image.init()
    for factory, accept in list(Image.OPEN.values()):
        if accept is not None and accept(prefix) is not True:
            continue
        try:
            return factory(io.BytesIO(data), "")
        except Exception:  # noqa: BLE001 - not this plugin's format (Image.open skips these the same way)
            continue
    return None


def _open_lazily(data: np.ndarray, source: object, max_pixels: Optional[int]) -> Image.Image:
    """Encoded ``data`` opened by Pillow (header parsed, no pixel decoded) and checked against ``max_pixels``.

    Pillow's own guard (a warning above ``Image.MAX_IMAGE_PIXELS``, an error above twice that, whatever the
    caller allows) is replaced by ``max_pixels``. Raises ImageTooLargeError, or Pillow's errors for data it cannot
    identify.
    """
    try:
        # (catch_warnings swaps the process-wide filter list; in the worst interleaving of threads the ignore
        # filter for this one warning class outlives the block, which is harmless.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        opened = _open_past_pillow_guard(data)
        if opened is None:
            raise ImageTooLargeError(
                f"{source}: image has more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels (Pillow's "
                f"decompression-bomb limit) and its header cannot be read otherwise"
            ) from None
    check_pixel_limit(source, opened.width, opened.height, max_pixels)
    return opened


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


def image_size(data: Union[bytes, np.ndarray], source: object = "image",
               max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Optional[Tuple[int, int]]:
    """(width, height) of an encoded image from its header alone, or None when Pillow cannot parse the header
    (a format only OpenCV reads, or a damaged file: the decoder then reports it).

    Raises:
        ImageTooLargeError: the header declares more than ``max_pixels`` pixels.
    """
    try:
        opened = _open_lazily(np.frombuffer(data, np.uint8), source, max_pixels)
    except ImageTooLargeError:
        raise
    except Exception:  # noqa: BLE001 - only a pre-check: whatever Pillow cannot parse, the decoder judges
        return None
    with opened:
        return opened.size


def decode_image(data: Union[bytes, np.ndarray], source: object = "image",
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (a file's, an upload's) -> (H, W, 3) uint8 RGB, EXIF orientation applied.

    Images whose header declares more than ``max_pixels`` pixels (None: no limit) raise
    :class:`ImageTooLargeError` before decoding; OpenCV's own ceiling (2**30 pixels) still applies. Data that
    does not decode (not an image, truncated, corrupt) raises :class:`DataError` naming ``source``.
    """
    data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if data.size == 0:
        raise DataError(f"{source}: empty (0 bytes)")
    if max_pixels is not None:
        image_size(data, source, max_pixels)
    try:
        with quiet_opencv():
            image = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB)
    except cv2.error as error:  # e.g. above OpenCV's own pixel ceiling
        raise DataError(f"{source}: not a readable image ({str(error).strip().splitlines()[-1]})") from None
    if image is None:
        raise DataError(f"{source}: not a readable image (truncated or corrupt, or an unsupported format)")
    return image


def read_image(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array, EXIF orientation applied (:func:`decode_image`)."""
    return decode_image(_read_bytes(path), path, max_pixels)


def read_mask(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a label mask to an (H, W) integer array of the stored values (uint8, or int32 for 16-bit files).

    Palette PNGs give their indices; an RGB(A) mask is accepted only if its channels are equal (a grey mask saved
    as colour); colour-coded masks must be converted to class indices first. Masks whose header declares more than
    ``max_pixels`` pixels raise :class:`ImageTooLargeError` before decoding.
    """
    data = _read_bytes(path)  # one clear message for missing and empty files
    try:
        with _open_lazily(data, path, max_pixels) as opened:
            opened.load()
            mask_image = ImageOps.exif_transpose(opened)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable mask (not an image, or its header is damaged)") from None
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
