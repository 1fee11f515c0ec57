"""``Segmenter``: an image in, a mask out, from one checkpoint file.

    >>> from seg import Segmenter
    >>> segmenter = Segmenter.from_checkpoint("outputs/ade20k_resnest101/best.pth")
    >>> mask = segmenter.predict("room.jpg")                  # (H, W) class ids at the image's size
    >>> segmenter.overlay("room.jpg", mask).save("room_overlay.png")

Everything inference needs (architecture, classes, palette, normalisation, training sizes) is read from the
checkpoint. Calls hold no shared mutable state, so one Segmenter can serve several threads; nothing is
downloaded.

Large images: inputs above ``max_pixels`` (default 100 megapixels, checked from a file's header before decoding)
are refused with :class:`~seg.data.io.ImageTooLargeError`. Up to ``max_whole_pixels`` (default 2048 x 2048) an
image runs in one whole-image pass; above it, :meth:`Segmenter.predict` slides ``crop_size`` windows over it tile by
tile (:func:`tile_spans`), so besides the image (3 bytes a pixel) and the mask (1 byte a pixel) memory holds one
tile's probabilities, at most ``num_classes x (3 crop)^2`` float32 (150 classes, crop 512: 1.4 GB), whatever the
image size. The result equals one slide pass over the whole image. :meth:`Segmenter.predict_proba` returns
``num_classes x H x W`` float32 by definition, and multi-scale + flip averages at that size too: for those, memory
grows with the image, bounded by ``max_pixels``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from seg.data.io import DEFAULT_MAX_PIXELS, check_pixel_limit, read_image
from seg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from seg.engine.inference import (MS_SCALES, InferenceConfig, inference_model, predict_probabilities,
                                  window_starts)
from seg.engine.plots import colorize, overlay
from seg.engine.precision import precision_name, resolve_precision

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

# Above this many pixels an image is predicted by sliding windows, tile by tile, rather than in one pass.
DEFAULT_MAX_WHOLE_PIXELS = 2048 * 2048
# Windows per tile side: a tile spans 3 strides + 1 crop = 3 crops at the default 2/3-crop stride; neighbouring
# tiles recompute one window column/row, about 1.8x the windows of an untiled pass in 2-D.
WINDOWS_PER_TILE = 4


def to_rgb_array(image: ImageInput, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any supported image input -> (H, W, 3) uint8 RGB.

    Accepts a file path, a PIL image (any mode), a numpy array (H x W gray, H x W x 3 RGB or H x W x 4 RGBA,
    uint8, or floats in [0, 1]) or a (3, H, W) / (H, W) tensor (uint8, or floats in [0, 1]). Images of more than
    ``max_pixels`` pixels (None: no limit) raise ImageTooLargeError; files and PIL images are checked before
    their pixels are decoded.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, max_pixels)
    if isinstance(image, Image.Image):
        check_pixel_limit(getattr(image, "filename", "") or "image", image.width, image.height, max_pixels)
        return np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() == 3 and tensor.shape[0] in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        image = tensor.numpy()
    array = np.asarray(image)
    if array.ndim in (2, 3):  # before the float -> uint8 copy below
        check_pixel_limit("image", array.shape[1], array.shape[0], max_pixels)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"image arrays must be uint8 or floats in [0, 1], got {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[..., :3])
    raise ValueError(f"expected an H x W, H x W x 3 or H x W x 4 image, got shape {array.shape}")


def tile_spans(length: int, crop: int, stride: int, windows_per_tile: int = WINDOWS_PER_TILE
               ) -> List[Tuple[int, int, int, int]]:
    """Cut one axis of a slide pass into tiles that reproduce it exactly.

    Returns ``(input_start, input_end, output_start, output_end)`` per tile. Sliding windows over the input range
    alone puts them exactly where the pass over the whole axis does (tiles start on the stride grid), and every
    position of the output range is covered by the same windows in both, so its averaged probabilities are the
    same. Output ranges partition ``0..length``. A tile holds ``windows_per_tile`` windows, or more where that
    many windows overlap one position.
    """
    starts = np.asarray(window_starts(length, crop, stride))
    if len(starts) <= windows_per_tile:
        return [(0, length, 0, length)]
    ends = starts + crop
    positions = np.arange(length)
    first_covering = np.searchsorted(ends, positions, side="right")
    last_covering = np.searchsorted(starts, positions, side="right") - 1
    per_tile = max(windows_per_tile, int((last_covering - first_covering).max()) + 2)
    spans, first, output_start = [], 0, 0
    while output_start < length:
        last = min(first + per_tile - 1, len(starts) - 1)
        output_end = length if last == len(starts) - 1 else int(starts[last + 1])
        spans.append((int(starts[first]), int(ends[last]), output_start, output_end))
        output_start = output_end
        if output_start < length:
            first = int(first_covering[output_start])  # the windows this tile's first position needs
    return spans


class Segmenter:
    """A trained segmentor with its classes, palette and preprocessing.

    Args:
        model: a segmentor (it is put in eval mode; inference runs a copy with batch norm folded, on ``device``).
        classes: class names in train-id order.
        palette: (num_classes, 3) uint8 colours.
        mean, std: normalisation of 0..1 RGB inputs.
        device: where inference runs.
        dataset: name of the training dataset (selects the multi-scale scales).
        crop_size, base_size: the training sizes, used by multi-scale + flip and by large images (slide windows
            of ``crop_size``).
        max_pixels: larger images are refused (ImageTooLargeError; files are checked from their header, before
            decoding); None: no limit.
        max_whole_pixels: larger images are predicted by sliding windows, tile by tile (module docstring).
        precision: what the network computes in: ``auto`` (default: bf16 on a CPU with AMX or AVX-512 BF16 and on
            a bf16 GPU, else fp32), ``fp32``, ``bf16`` or ``fp16``. Softmax, averaging and argmax are fp32 in all
            of them; bf16 agrees with fp32 on all but a fraction of a percent of pixels (bench/RESULTS.md).
    """

    def __init__(self, model: torch.nn.Module, classes: Sequence[str], palette: np.ndarray, mean: Sequence[float],
                 std: Sequence[float], device: Optional[Union[str, torch.device]] = None, dataset: str = "",
                 crop_size: int = 512, base_size: Optional[int] = None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 max_whole_pixels: int = DEFAULT_MAX_WHOLE_PIXELS, precision: str = "auto") -> None:
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive (or None for no limit), got {max_pixels}")
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_precision(precision, self.device)
        # A copy with batch norm folded, in channels_last and the precision: faster; the caller's module is untouched.
        self.model = inference_model(model, self.device, self.dtype)
        self.classes = tuple(classes)
        self.palette = np.asarray(palette, dtype=np.uint8)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.dataset = dataset
        self.crop_size = crop_size
        self.base_size = base_size
        self.max_pixels = max_pixels
        self.max_whole_pixels = max_whole_pixels

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                        crop_size: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                        max_whole_pixels: int = DEFAULT_MAX_WHOLE_PIXELS, precision: str = "auto") -> "Segmenter":
        """Everything from one ``seg`` checkpoint (read with ``weights_only=True``); CUDA when available.

        ``crop_size`` overrides the training crop as the slide window; the limits and ``precision`` are the
        constructor's.
        """
        payload = load_checkpoint(path)
        config = payload.get("config", {})
        normalisation = payload.get("normalisation", {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})
        return cls(model_from_checkpoint(payload), payload["classes"], np.array(payload["palette"], np.uint8),
                   normalisation["mean"], normalisation["std"], device, payload.get("dataset", ""),
                   crop_size or config.get("crop_size") or 512, config.get("base_size"), max_pixels,
                   max_whole_pixels, precision)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def precision(self) -> str:
        """What the network computes in: ``fp32``, ``bf16`` or ``fp16`` (``auto`` resolved for this device)."""
        return precision_name(self.dtype)

    def read(self, image: ImageInput) -> np.ndarray:
        """The (H, W, 3) uint8 RGB array that prediction works on, with this Segmenter's ``max_pixels`` applied."""
        return to_rgb_array(image, self.max_pixels)

    def _inference(self, ms_flip: bool, scales: Optional[Sequence[float]]) -> InferenceConfig:
        if not ms_flip and scales is None:
            return InferenceConfig()
        chosen = tuple(scales) if scales is not None else MS_SCALES.get(self.dataset, (0.5, 0.75, 1.0, 1.25, 1.5,
                                                                                        1.75))
        return InferenceConfig(mode="slide" if ms_flip else "whole", crop_size=self.crop_size, scales=chosen,
                               flip=ms_flip, base_size=self.base_size if ms_flip else None)

    def _needs_tiles(self, rgb: np.ndarray, ms_flip: bool, scales: Optional[Sequence[float]]) -> bool:
        """Single-scale prediction of an image too large for one whole-image pass."""
        return not ms_flip and scales is None and rgb.shape[0] * rgb.shape[1] > self.max_whole_pixels

    @torch.inference_mode()
    def _tiled_slide(self, rgb: np.ndarray) -> Iterator[Tuple[slice, slice, torch.Tensor]]:
        """(rows, columns, probabilities there) tile by tile, together one slide pass over the whole image."""
        config = InferenceConfig(mode="slide", crop_size=self.crop_size)
        stride = config.window_stride  # the tile plan puts tiles on the same window grid as one slide pass
        height, width = rgb.shape[:2]
        for y0, y1, out_y0, out_y1 in tile_spans(height, self.crop_size, stride):
            for x0, x1, out_x0, out_x1 in tile_spans(width, self.crop_size, stride):
                probabilities = predict_probabilities(self.model, self._tensor(rgb[y0:y1, x0:x1]), config)[0]
                yield (slice(out_y0, out_y1), slice(out_x0, out_x1),
                       probabilities[:, out_y0 - y0 : out_y1 - y0, out_x0 - x0 : out_x1 - x0])

    def _tensor(self, rgb: np.ndarray) -> torch.Tensor:
        if not rgb.flags.writeable:  # e.g. a caller's read-only array: torch wants to own a writable buffer
            rgb = rgb.copy()
        image = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)
        return (image - self._mean) / self._std

    @torch.inference_mode()
    def predict_proba(self, image: ImageInput, ms_flip: bool = False,
                      scales: Optional[Sequence[float]] = None) -> np.ndarray:
        """(C, H, W) float32 class probabilities at the image's original size."""
        rgb = self.read(image)
        if self._needs_tiles(rgb, ms_flip, scales):
            out = np.empty((self.num_classes, *rgb.shape[:2]), dtype=np.float32)
            for rows, columns, probabilities in self._tiled_slide(rgb):
                out[:, rows, columns] = probabilities.cpu().numpy()
            return out
        probabilities = predict_probabilities(self.model, self._tensor(rgb), self._inference(ms_flip, scales))
        return probabilities[0].cpu().numpy()

    def predict(self, image: ImageInput, ms_flip: bool = False,
                scales: Optional[Sequence[float]] = None) -> np.ndarray:
        """(H, W) integer class ids at the image's original size (uint8 below 256 classes)."""
        dtype = np.uint8 if self.num_classes < 256 else np.int32
        rgb = self.read(image)
        if self._needs_tiles(rgb, ms_flip, scales):  # no (C, H, W) array: one tile's probabilities at a time
            mask = np.empty(rgb.shape[:2], dtype=dtype)
            for rows, columns, probabilities in self._tiled_slide(rgb):
                mask[rows, columns] = probabilities.argmax(0).cpu().numpy()
            return mask
        return self.predict_proba(rgb, ms_flip, scales).argmax(0).astype(dtype)

    def predict_batch(self, images: Sequence[ImageInput], ms_flip: bool = False,
                      scales: Optional[Sequence[float]] = None) -> List[np.ndarray]:
        """One mask per image (images of different sizes are fine)."""
        return [self.predict(image, ms_flip, scales) for image in images]

    def colorize(self, mask: np.ndarray) -> Image.Image:
        """The mask in the palette's colours."""
        return colorize(np.asarray(mask), self.palette)

    def overlay(self, image: ImageInput, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
        """The image with the coloured mask blended over it."""
        return overlay(self.read(image), np.asarray(mask), self.palette, alpha)

    def save_mask(self, mask: np.ndarray, path: Union[str, os.PathLike]) -> None:
        """A palette PNG: pixel values are class ids, viewers show the palette's colours."""
        image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: len(self.palette)] = self.palette
        image.putpalette(flat.ravel().tolist())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
