"""``Segmenter``: an image in, a mask out, from one checkpoint file.

    >>> from seg import Segmenter
    >>> segmenter = Segmenter.from_checkpoint("outputs/ade20k_resnest101/best.pth")
    >>> mask = segmenter.predict("room.jpg")                  # (H, W) class ids at the image's size
    >>> segmenter.overlay("room.jpg", mask).save("room_overlay.png")

Everything inference needs (architecture, classes, palette, normalisation, training sizes) is read from the
checkpoint. Calls hold no shared mutable state, so one Segmenter can serve several threads; nothing is
downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from seg.data.io import read_image
from seg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from seg.engine.inference import MS_SCALES, InferenceConfig, predict_probabilities
from seg.engine.plots import colorize, overlay
from seg.models.fusion import fuse_conv_bn

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """Any supported image input -> (H, W, 3) uint8 RGB.

    Accepts a file path, a PIL image (any mode), a numpy array (H x W gray, H x W x 3 RGB or H x W x 4 RGBA,
    uint8, or floats in [0, 1]) or a (3, H, W) / (H, W) tensor (uint8, or floats in [0, 1]).
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() == 3 and tensor.shape[0] in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        image = tensor.numpy()
    array = np.asarray(image)
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


class Segmenter:
    """A trained segmentor with its classes, palette and preprocessing.

    Args:
        model: a segmentor (it is put in eval mode; inference runs a copy with batch norm folded, on ``device``).
        classes: class names in train-id order.
        palette: (num_classes, 3) uint8 colours.
        mean, std: normalisation of 0..1 RGB inputs.
        device: where inference runs.
        dataset: name of the training dataset (selects the multi-scale scales).
        crop_size, base_size: the training sizes, used by multi-scale + flip (slide windows of ``crop_size``).
    """

    def __init__(self, model: torch.nn.Module, classes: Sequence[str], palette: np.ndarray, mean: Sequence[float],
                 std: Sequence[float], device: Optional[Union[str, torch.device]] = None, dataset: str = "",
                 crop_size: int = 512, base_size: Optional[int] = None) -> None:
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # A copy with batch norm folded, in channels_last: the same outputs, faster; the caller's module is untouched.
        self.model = fuse_conv_bn(model.eval()).to(self.device, memory_format=torch.channels_last)
        self.classes = tuple(classes)
        self.palette = np.asarray(palette, dtype=np.uint8)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.dataset = dataset
        self.crop_size = crop_size
        self.base_size = base_size

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None
                        ) -> "Segmenter":
        """Everything from one ``seg`` checkpoint (read with ``weights_only=True``); CUDA when available."""
        payload = load_checkpoint(path)
        config = payload.get("config", {})
        normalisation = payload.get("normalisation", {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})
        return cls(model_from_checkpoint(payload), payload["classes"], np.array(payload["palette"], np.uint8),
                   normalisation["mean"], normalisation["std"], device, payload.get("dataset", ""),
                   config.get("crop_size") or 512, config.get("base_size"))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _inference(self, ms_flip: bool, scales: Optional[Sequence[float]]) -> InferenceConfig:
        if not ms_flip and scales is None:
            return InferenceConfig()
        chosen = tuple(scales) if scales is not None else MS_SCALES.get(self.dataset, (0.5, 0.75, 1.0, 1.25, 1.5,
                                                                                        1.75))
        return InferenceConfig(mode="slide" if ms_flip else "whole", crop_size=self.crop_size, scales=chosen,
                               flip=ms_flip, base_size=self.base_size if ms_flip else None)

    def _tensor(self, rgb: np.ndarray) -> torch.Tensor:
        if not rgb.flags.writeable:  # e.g. a caller's read-only array: torch wants to own a writable buffer
            rgb = rgb.copy()
        image = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)
        return (image - self._mean) / self._std

    @torch.inference_mode()
    def predict_proba(self, image: ImageInput, ms_flip: bool = False,
                      scales: Optional[Sequence[float]] = None) -> np.ndarray:
        """(C, H, W) float32 class probabilities at the image's original size."""
        rgb = to_rgb_array(image)
        probabilities = predict_probabilities(self.model, self._tensor(rgb), self._inference(ms_flip, scales))
        return probabilities[0].cpu().numpy()

    def predict(self, image: ImageInput, ms_flip: bool = False,
                scales: Optional[Sequence[float]] = None) -> np.ndarray:
        """(H, W) integer class ids at the image's original size (uint8 below 256 classes)."""
        mask = self.predict_proba(image, ms_flip, scales).argmax(0)
        return mask.astype(np.uint8 if self.num_classes < 256 else np.int32)

    def predict_batch(self, images: Sequence[ImageInput], ms_flip: bool = False,
                      scales: Optional[Sequence[float]] = None) -> List[np.ndarray]:
        """One mask per image (images of different sizes are fine)."""
        return [self.predict(image, ms_flip, scales) for image in images]

    def colorize(self, mask: np.ndarray) -> Image.Image:
        """The mask in the palette's colours."""
        return colorize(np.asarray(mask), self.palette)

    def overlay(self, image: ImageInput, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
        """The image with the coloured mask blended over it."""
        return overlay(to_rgb_array(image), np.asarray(mask), self.palette, alpha)

    def save_mask(self, mask: np.ndarray, path: Union[str, os.PathLike]) -> None:
        """A palette PNG: pixel values are class ids, viewers show the palette's colours."""
        image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: len(self.palette)] = self.palette
        image.putpalette(flat.ravel().tolist())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
