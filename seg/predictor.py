"""``Segmenter``: an image in, a mask out, from one checkpoint file or shared model folder.

    >>> from seg import Segmenter
    >>> segmenter = Segmenter.from_checkpoint("outputs/ade20k_resnest101/best.pth")
    >>> mask = segmenter.predict("room.jpg")                  # (H, W) class ids at the image's size
    >>> segmenter.overlay("room.jpg", mask).save("room_overlay.png")
    >>> segmenter.save_pretrained("deeplab-ade20k")           # config.json, model.safetensors, README.md
    >>> Segmenter.from_pretrained("deeplab-ade20k")           # or a Hugging Face Hub repo id

Everything inference needs (architecture, classes, palette, normalisation, training sizes, test scales) is read
from the model card (:mod:`seg.card`). Inference options mean what they mean in ``seg.eval``
(:class:`~seg.engine.inference.InferenceOptions`): by default an image is resized so its long side is the
training base size, predicted whole, and its probabilities resized back to the image. Calls hold no shared
mutable state, so one Segmenter can serve several threads; nothing is downloaded except by
:meth:`Segmenter.from_pretrained` given a Hub repo id.

Large images: inputs above ``max_pixels`` (default 100 megapixels, checked from a file's header before decoding)
are refused with :class:`~seg.data.io.ImageTooLargeError`. Single-scale prediction of an image above
``max_whole_pixels`` (default 2048 x 2048) keeps memory bounded: at its own size (``base_size=NATIVE``)
:meth:`Segmenter.predict` slides ``crop_size`` windows over it tile by tile (:func:`tile_spans`; the result
equals one slide pass over the whole image), and resized to the base size, the probabilities are resized back
and reduced to class ids band by band (:func:`banded_argmax`). Besides the image (3 bytes a pixel) and the mask
(1 byte a pixel) memory then holds one tile's or band's probabilities. :meth:`Segmenter.predict_proba` returns
``num_classes x H x W`` float32 by definition, and multi-scale + flip averages at that size too: for those,
memory grows with the image, bounded by ``max_pixels``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from seg.card import ModelCard
from seg.data.io import DEFAULT_MAX_PIXELS, check_pixel_limit, read_image
from seg.engine.inference import (NATIVE, InferenceConfig, InferenceOptions, inference_model,
                                  predict_probabilities, resolve_inference, scaled_size,
                                  single_scale_probabilities, window_starts)
from seg.engine.plots import colorize, overlay
from seg.engine.precision import precision_name, resolve_precision

__all__ = ["NATIVE", "Segmenter", "banded_argmax", "tile_spans", "to_rgb_array"]

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


def banded_argmax(probabilities: torch.Tensor, size: Tuple[int, int], max_band_pixels: int) -> np.ndarray:
    """(C, h, w) probabilities -> (H, W) int64 class ids of their bilinear (align_corners=True) resize to ``size``,
    computed in bands of rows of at most ``max_band_pixels`` output pixels, so memory holds one band's
    ``C x rows x W`` values rather than ``C x H x W``.

    The interpolation weights are those of ``F.interpolate(..., mode="bilinear", align_corners=True)``; the values
    agree with it to float rounding, so the labels differ only where two classes tie to ~1e-6.
    """
    height, width = size
    classes, low_h, low_w = probabilities.shape

    def taps(out: int, low: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = torch.arange(out, dtype=torch.float64) * ((low - 1) / (out - 1) if out > 1 else 0.0)
        first = source.floor().long().clamp_(0, low - 1)
        second = (first + 1).clamp_(max=low - 1)
        weight = (source - first).to(probabilities.dtype).to(probabilities.device)
        return first.to(probabilities.device), second.to(probabilities.device), weight

    y0, y1, wy = taps(height, low_h)
    x0, x1, wx = taps(width, low_w)
    rows_per_band = max(1, max_band_pixels // max(1, width))
    mask = np.empty((height, width), dtype=np.int64)
    for start in range(0, height, rows_per_band):
        band = slice(start, min(height, start + rows_per_band))
        weight = wy[band].view(1, -1, 1)
        rows = probabilities[:, y0[band]] * (1 - weight) + probabilities[:, y1[band]] * weight  # (C, rows, w)
        values = rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx  # (C, rows, W)
        mask[band] = values.argmax(0).cpu().numpy()
    return mask


class Segmenter:
    """A trained segmentor with its model card: classes, palette, preprocessing and inference defaults.

    Args:
        model: a segmentor (it is put in eval mode; inference runs a copy with batch norm folded, on ``device``).
        card: the model's :class:`~seg.card.ModelCard` (classes, palette, normalisation, training sizes).
        device: where inference runs (default: CUDA when available).
        max_pixels: larger images are refused (ImageTooLargeError; files are checked from their header, before
            decoding); None: no limit.
        max_whole_pixels: larger images are predicted in tiles or bands (module docstring).
        precision: what the network computes in: ``auto`` (default: bf16 on a CPU with AMX or AVX-512 BF16 and on
            a bf16 GPU, else fp32), ``fp32``, ``bf16`` or ``fp16``. Softmax, averaging and argmax are fp32 in all
            of them; bf16 agrees with fp32 on all but a fraction of a percent of pixels (bench/RESULTS.md).
        options: this Segmenter's default inference options (e.g. ``InferenceOptions(crop_size=769)``); each
            call's keyword arguments override them.
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: Optional[Union[str, torch.device]] = None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, max_whole_pixels: int = DEFAULT_MAX_WHOLE_PIXELS,
                 precision: str = "auto", options: InferenceOptions = InferenceOptions()) -> None:
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive (or None for no limit), got {max_pixels}")
        resolve_inference(card, options)  # a bad default option fails here, not at the first call
        self.card = card
        self.options = options
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_precision(precision, self.device)
        # The weights as trained, for save_pretrained (the caller's tensors, not a copy), and a copy with batch norm
        # folded, in channels_last and the precision, for inference: faster; the caller's module is untouched.
        self._weights = model.state_dict()
        self.model = inference_model(model, self.device, self.dtype)
        self.palette = np.asarray(card.palette, dtype=np.uint8)
        self._mean = torch.tensor(card.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(card.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.max_pixels = max_pixels
        self.max_whole_pixels = max_whole_pixels

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                        precision: str = "auto", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                        max_whole_pixels: int = DEFAULT_MAX_WHOLE_PIXELS, **options: Any) -> "Segmenter":
        """Everything from one ``seg`` checkpoint file (read with ``weights_only=True``); CUDA when available.
        The same as :meth:`from_pretrained`, which also takes shared folders and Hub repo ids. ``options`` are
        default inference options (e.g. ``crop_size=769`` for the slide window)."""
        return cls.from_pretrained(path, None, device, precision, max_pixels, max_whole_pixels, **options)

    @classmethod
    def from_pretrained(cls, directory_or_repo_id: Union[str, os.PathLike], revision: Optional[str] = None,
                        device: Optional[Union[str, torch.device]] = None, precision: str = "auto",
                        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                        max_whole_pixels: int = DEFAULT_MAX_WHOLE_PIXELS, **options: Any) -> "Segmenter":
        """A model shared by :meth:`save_pretrained` or :meth:`push_to_hub`: a local folder, or a Hugging Face Hub
        repo id (``owner/name``, at ``revision``: a branch, tag or commit) through ``huggingface_hub``, which
        caches it and honours ``HF_HUB_OFFLINE=1`` (``pip install "seg[hub]"``). Only ``config.json`` and
        ``model.safetensors`` are read: nothing is unpickled. ``options`` are default inference options."""
        from seg.hub import read_model

        from seg.engine.checkpoint import model_from_card

        card, weights = read_model(directory_or_repo_id, revision=revision)
        model = model_from_card(card, weights, str(directory_or_repo_id))
        return cls(model, card, device, max_pixels, max_whole_pixels, precision, InferenceOptions(**options))

    def save_pretrained(self, directory: Union[str, os.PathLike], license: Optional[str] = None) -> Path:
        """Write ``directory/config.json`` (the model card), ``model.safetensors`` (the weights as trained, no
        pickle) and ``README.md`` (a Hub model card with YAML metadata and the metrics); returns the folder.
        ``license`` overrides the card's licence of the weights (an SPDX id such as ``apache-2.0``)."""
        from seg.hub import save_folder

        card = self.card if license is None else self.card.replace(license=license)
        return save_folder(directory, card, self._weights)

    def push_to_hub(self, repo_id: str, private: bool = False, token: Optional[str] = None,
                    revision: Optional[str] = None, commit_message: str = "Upload seg model") -> str:
        """:meth:`save_pretrained` into a temporary folder and upload it to the Hub repo ``repo_id`` (created if
        needed); returns the commit URL. Needs ``pip install "seg[hub]"`` and a token (``huggingface-cli login``
        or ``token``)."""
        from seg.hub import push_folder

        return push_folder(self.card, self._weights, repo_id, private=private, token=token, revision=revision,
                           commit_message=commit_message)

    @property
    def classes(self) -> Tuple[str, ...]:
        return self.card.classes

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    @property
    def dataset(self) -> str:
        return self.card.dataset

    @property
    def crop_size(self) -> int:
        """The slide window: this Segmenter's ``crop_size`` option, else the training crop."""
        return self.options.crop_size or self.card.crop_size

    @property
    def base_size(self) -> Optional[int]:
        """The training base size (the long side images are resized to by default)."""
        return self.card.base_size

    @property
    def precision(self) -> str:
        """What the network computes in: ``fp32``, ``bf16`` or ``fp16`` (``auto`` resolved for this device)."""
        return precision_name(self.dtype)

    def read(self, image: ImageInput) -> np.ndarray:
        """The (H, W, 3) uint8 RGB array that prediction works on, with this Segmenter's ``max_pixels`` applied."""
        return to_rgb_array(image, self.max_pixels)

    def inference_config(self, ms_flip: Optional[bool] = None, scales: Optional[Sequence[float]] = None,
                         **options: Any) -> InferenceConfig:
        """The :class:`InferenceConfig` a call with these options runs (see
        :class:`~seg.engine.inference.InferenceOptions`): this Segmenter's defaults overridden by the call's."""
        given = {"ms_flip": ms_flip, "scales": tuple(scales) if scales is not None else None, **options}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(InferenceOptions)})
        if unknown:
            raise TypeError(f"unknown inference option(s) {', '.join(unknown)}; see seg.engine.inference."
                            f"InferenceOptions")
        chosen = {key: value for key, value in given.items() if value is not None}
        return resolve_inference(self.card, dataclasses.replace(self.options, **chosen))

    def _single_pass(self, config: InferenceConfig) -> bool:
        return len(config.scales) == 1 and not config.flip

    def _at_own_size(self, rgb: np.ndarray, config: InferenceConfig) -> bool:
        height, width = rgb.shape[:2]
        return scaled_size(height, width, config.scales[0], config.base_size) == (height, width)

    def _is_large(self, rgb: np.ndarray) -> bool:
        return rgb.shape[0] * rgb.shape[1] > self.max_whole_pixels

    @torch.inference_mode()
    def _tiled_slide(self, rgb: np.ndarray, config: InferenceConfig) -> Iterator[Tuple[slice, slice, torch.Tensor]]:
        """(rows, columns, probabilities there) tile by tile, together one slide pass over the whole image."""
        # The image at its own size (the caller checked): no resize of the tiles, each one slide pass.
        config = dataclasses.replace(config, mode="slide", scales=(1.0,), base_size=None)
        crop, stride = config.crop_size, config.window_stride  # tiles sit on the same window grid as one pass
        height, width = rgb.shape[:2]
        for y0, y1, out_y0, out_y1 in tile_spans(height, crop, stride):
            for x0, x1, out_x0, out_x1 in tile_spans(width, crop, stride):
                probabilities = predict_probabilities(self.model, self._tensor(rgb[y0:y1, x0:x1]), config)[0]
                yield (slice(out_y0, out_y1), slice(out_x0, out_x1),
                       probabilities[:, out_y0 - y0 : out_y1 - y0, out_x0 - x0 : out_x1 - x0])

    @torch.inference_mode()
    def _resized_probabilities(self, rgb: np.ndarray, config: InferenceConfig) -> torch.Tensor:
        """(C, h, w): one pass's probabilities at the view's (scaled) size, not yet resized to the image."""
        image = self._tensor(rgb)
        size = scaled_size(rgb.shape[0], rgb.shape[1], config.scales[0], config.base_size)
        view = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
        return single_scale_probabilities(self.model, view, config)[0]

    def _tensor(self, rgb: np.ndarray) -> torch.Tensor:
        if not rgb.flags.writeable:  # e.g. a caller's read-only array: torch wants to own a writable buffer
            rgb = rgb.copy()
        image = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)
        return (image - self._mean) / self._std

    @torch.inference_mode()
    def predict_proba(self, image: ImageInput, ms_flip: Optional[bool] = None, scales: Optional[Sequence[float]] = None,
                      **options: Any) -> np.ndarray:
        """(C, H, W) float32 class probabilities at the image's original size. ``options``: the other fields of
        :class:`~seg.engine.inference.InferenceOptions` (``mode``, ``crop_size``, ``stride``, ``base_size``, ...)."""
        config = self.inference_config(ms_flip, scales, **options)
        rgb = self.read(image)
        if self._single_pass(config) and self._is_large(rgb) and self._at_own_size(rgb, config):
            out = np.empty((self.num_classes, *rgb.shape[:2]), dtype=np.float32)
            for rows, columns, probabilities in self._tiled_slide(rgb, config):
                out[:, rows, columns] = probabilities.cpu().numpy()
            return out
        return predict_probabilities(self.model, self._tensor(rgb), config)[0].cpu().numpy()

    def predict(self, image: ImageInput, ms_flip: Optional[bool] = None, scales: Optional[Sequence[float]] = None,
                **options: Any) -> np.ndarray:
        """(H, W) integer class ids at the image's original size (uint8 below 256 classes); options as in
        :meth:`predict_proba`."""
        config = self.inference_config(ms_flip, scales, **options)
        dtype = np.uint8 if self.num_classes < 256 else np.int32
        rgb = self.read(image)
        if self._single_pass(config) and self._is_large(rgb):  # no (C, H, W) array: a tile or band at a time
            if self._at_own_size(rgb, config):
                mask = np.empty(rgb.shape[:2], dtype=dtype)
                with torch.inference_mode():
                    for rows, columns, probabilities in self._tiled_slide(rgb, config):
                        mask[rows, columns] = probabilities.argmax(0).cpu().numpy()
                return mask
            probabilities = self._resized_probabilities(rgb, config)
            return banded_argmax(probabilities, rgb.shape[:2], self.max_whole_pixels).astype(dtype)
        return self.predict_proba(rgb, ms_flip, scales, **options).argmax(0).astype(dtype)

    def predict_batch(self, images: Sequence[ImageInput], ms_flip: Optional[bool] = None,
                      scales: Optional[Sequence[float]] = None, **options: Any) -> List[np.ndarray]:
        """One (H, W) mask per image, as :meth:`predict` gives it; images of different sizes are fine.

        Images of the same size go through the network together, in batches of at most ``max_whole_pixels``
        pixels (a service's concurrent requests in one forward pass: ``seg.serve --max-batch``). Larger images
        are predicted one at a time, as by :meth:`predict`.
        """
        config = self.inference_config(ms_flip, scales, **options)
        dtype = np.uint8 if self.num_classes < 256 else np.int32
        rgbs = [self.read(image) for image in images]
        masks: List[Optional[np.ndarray]] = [None] * len(rgbs)
        same_size: Dict[Tuple[int, int], List[int]] = {}
        for index, rgb in enumerate(rgbs):
            if self._is_large(rgb):
                masks[index] = self.predict(rgb, ms_flip, scales, **options)
            else:
                same_size.setdefault(rgb.shape[:2], []).append(index)
        with torch.inference_mode():
            for (height, width), indices in same_size.items():
                per_pass = max(1, self.max_whole_pixels // (height * width))
                for first in range(0, len(indices), per_pass):
                    chunk = indices[first : first + per_pass]
                    batch = torch.cat([self._tensor(rgbs[index]) for index in chunk])
                    labels = predict_probabilities(self.model, batch, config).argmax(1).cpu().numpy()
                    for index, label in zip(chunk, labels):
                        masks[index] = label.astype(dtype)
        return masks  # type: ignore[return-value]

    def colorize(self, mask: np.ndarray) -> Image.Image:
        """The mask in the palette's colours."""
        return colorize(np.asarray(mask), self.palette)

    def overlay(self, image: ImageInput, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
        """The image with the coloured mask blended over it."""
        return overlay(self.read(image), np.asarray(mask), self.palette, alpha)

    def mask_image(self, mask: np.ndarray) -> Image.Image:
        """A palette ("P") image of the mask: pixel values are class ids, viewers show the palette's colours."""
        image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: len(self.palette)] = self.palette
        image.putpalette(flat.ravel().tolist())
        return image

    def save_mask(self, mask: np.ndarray, path: Union[str, os.PathLike]) -> None:
        """The mask as a palette PNG (:meth:`mask_image`)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.mask_image(mask).save(path)
