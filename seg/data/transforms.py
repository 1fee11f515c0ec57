"""Augmentation pipelines (albumentations): the paper's training recipe and full-resolution evaluation.

Train: random long-side rescale to [0.5, 2.0] x base size (aspect kept), pad to the crop (image 0, mask ignore),
random crop (optionally retried while one class covers more than ``cat_max_ratio`` of it), horizontal flip,
photometric distortion, ImageNet normalisation, tensors out. Eval: normalisation only.

Two steps are fused for speed (bench/data_pipeline.py measures them against the usual albumentations recipe):

- Rescale, pad and crop are one :class:`RandomRescaleCrop`: a single ``cv2.warpAffine`` per target samples the
  crop window straight from the source image, so the cost follows the crop size rather than the rescaled image
  (a 2048x1024 Cityscapes frame scaled x2 is never materialised). Sampling positions are those of
  ``cv2.resize`` followed by a crop; masks use nearest-neighbour sampling and so never gain label values.
- Normalisation happens in the HWC uint8 -> CHW float32 copy that the tensor conversion makes anyway (10x
  faster than ``A.Normalize`` followed by a transpose).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import albumentations as A
import cv2
import numpy as np
import torch

from .base import IGNORE_INDEX, SampleDict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = Union[int, Tuple[int, int]]


def _pair(size: Size) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class RandomRescaleCrop(A.DualTransform):
    """Rescale so the long side is a random integer in ``scale_range`` x ``base_size``, pad to ``crop_size``
    (bottom/right, image ``fill``, mask ``fill_mask``) and take a random ``crop_size`` window, in one warp.

    Args:
        base_size: reference long side.
        crop_size: output (height, width) or side.
        scale_range: (min, max) factors of ``base_size`` for the long side.
        cat_max_ratio: retry the crop window (up to 10 times) while one class covers more than this fraction of
            its labelled pixels; 1.0 disables the check (mmsegmentation uses 0.75).
    """

    def __init__(
        self,
        base_size: int,
        crop_size: Size,
        scale_range: Tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 1.0,
        fill: int = 0,
        fill_mask: int = IGNORE_INDEX,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if base_size <= 0:
            raise ValueError(f"base_size must be positive, got {base_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < min <= max, got {scale_range}")
        self.base_size = base_size
        self.crop_size = _pair(crop_size)
        self.scale_range = tuple(scale_range)
        self.cat_max_ratio = cat_max_ratio
        self.fill = fill
        self.fill_mask = fill_mask

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("base_size", "crop_size", "scale_range", "cat_max_ratio", "fill", "fill_mask")

    @property
    def targets_as_params(self):  # the crop retry looks at the mask
        return ["image", "mask"]

    def _window(self, height: int, width: int, long_side: int) -> Dict[str, Any]:
        scale = long_side / max(height, width)
        # At least one pixel: a very thin image (1 x 1000) scaled down would otherwise lose its short side.
        if height > width:
            new_h, new_w = long_side, max(1, int(width * scale + 0.5))
        else:
            new_h, new_w = max(1, int(height * scale + 0.5)), long_side
        crop_h, crop_w = self.crop_size
        y0 = int(self.py_random.randint(0, max(new_h - crop_h, 0)))
        x0 = int(self.py_random.randint(0, max(new_w - crop_w, 0)))
        sy, sx = new_h / height, new_w / width
        # cv2.resize samples source (dst + 0.5) / s - 0.5; the crop shifts dst by (x0, y0).
        matrix = np.array([[sx, 0.0, 0.5 * sx - 0.5 - x0], [0.0, sy, 0.5 * sy - 0.5 - y0]], dtype=np.float64)
        # Output rows/columns past the rescaled image are padding.
        return {
            "matrix": matrix,
            "new_size": (new_h, new_w),
            "offset": (y0, x0),
            "valid_h": min(crop_h, new_h - y0),
            "valid_w": min(crop_w, new_w - x0),
        }

    def get_params_dependent_on_data(self, params: Dict[str, Any], data: Dict[str, Any]) -> Dict[str, Any]:
        height, width = params["shape"][:2]
        low, high = self.scale_range
        # At least 1: a small base size times a small scale would round the long side to 0.
        long_side = int(self.py_random.randint(max(1, int(self.base_size * low)), max(1, int(self.base_size * high))))
        window = self._window(height, width, long_side)
        mask = data.get("mask")
        if self.cat_max_ratio < 1.0 and mask is not None:
            for _ in range(10):
                cropped = self.apply_to_mask(mask, **window)
                window["mask_crop"] = cropped  # reused by apply_to_mask
                counts = _histogram(cropped)[:IGNORE_INDEX]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                window = self._window(height, width, long_side)
        return window

    def _rescale_crop(self, array: np.ndarray, nearest: bool, fill: int, matrix, new_size, offset, valid_h, valid_w):
        """The crop window of ``array`` rescaled to ``new_size``, padded with ``fill``.

        Two equivalent routes (same pixel-centre sampling positions): when the rescaled image is small, resizing
        it whole and slicing is cheapest; when it is large, one warp computes only the window.
        """
        crop_h, crop_w = self.crop_size
        new_h, new_w = new_size
        if new_h * new_w <= 2 * crop_h * crop_w:
            interpolation = cv2.INTER_NEAREST_EXACT if nearest else cv2.INTER_LINEAR
            resized = cv2.resize(array, (new_w, new_h), interpolation=interpolation)
            y0, x0 = offset
            out = np.full((crop_h, crop_w) + array.shape[2:], fill, dtype=array.dtype)
            out[:valid_h, :valid_w] = resized[y0 : y0 + valid_h, x0 : x0 + valid_w]
            return out
        interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        out = cv2.warpAffine(array, matrix, (crop_w, crop_h), flags=interpolation, borderMode=cv2.BORDER_REPLICATE)
        if valid_h < crop_h:
            out[valid_h:] = fill
        if valid_w < crop_w:
            out[:, valid_w:] = fill
        return out

    def apply(self, img: np.ndarray, mask_crop=None, **window) -> np.ndarray:
        return self._rescale_crop(img, False, self.fill, **_window_args(window))

    def apply_to_mask(self, mask: np.ndarray, mask_crop=None, **window) -> np.ndarray:
        if mask_crop is not None:
            return mask_crop
        return self._rescale_crop(mask, True, self.fill_mask, **_window_args(window))


def _window_args(params: Dict[str, Any]) -> Dict[str, Any]:
    """The window entries of albumentations' params (it adds its own, such as ``shape``)."""
    return {key: params[key] for key in ("matrix", "new_size", "offset", "valid_h", "valid_w")}


def _histogram(mask: np.ndarray) -> np.ndarray:
    """Pixel count of each value 0..255 of a uint8 mask (OpenCV's histogram: ~10x np.bincount's speed)."""
    if mask.dtype != np.uint8:
        return np.bincount(mask.ravel(), minlength=256)
    return cv2.calcHist([mask], [0], None, [256], [0, 256]).ravel()


def normalize_to_tensor(image: np.ndarray, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 ``(image / 255 - mean) / std`` in one copy.

    Args:
        mean, inv_std: (3, 1, 1) float32 tensors in 0..255 units (``mean * 255`` and ``1 / (std * 255)``).
    """
    out = torch.empty((image.shape[2], image.shape[0], image.shape[1]), dtype=torch.float32)
    out.copy_(torch.from_numpy(image).permute(2, 0, 1))
    return out.sub_(mean).mul_(inv_std)


class SegmentationTransform:
    """An albumentations pipeline applied to sample dicts, then normalisation into tensors: image (3, H, W)
    float32, mask (H, W) int64 (absent masks stay None). ``seed`` makes one call reproducible (see
    ``SeededSampler``)."""

    def __init__(
        self,
        compose: A.Compose,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.compose = compose
        self.mean = torch.tensor([m * 255.0 for m in mean], dtype=torch.float32).view(-1, 1, 1)
        self.inv_std = torch.tensor([1.0 / (s * 255.0) for s in std], dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, sample: SampleDict, seed: Optional[int] = None) -> SampleDict:
        if seed is not None:
            self.compose.set_random_seed(seed)
        mask = sample.get("mask")
        targets = {"image": sample["image"]} if mask is None else {"image": sample["image"], "mask": mask}
        out = self.compose(**targets) if self.compose.transforms else targets
        result = dict(sample, image=normalize_to_tensor(out["image"], self.mean, self.inv_std))
        if mask is not None:
            result["mask"] = torch.from_numpy(out["mask"].astype(np.int64, copy=False))
        return result

    def __repr__(self) -> str:
        return f"SegmentationTransform({self.compose!r})"


class HueSaturationShift(A.HueSaturationValue):
    """albumentations' HueSaturationValue, also on a single pixel: its HSV shift (albumentations 2.0.8) crashes on a
    1 x 1 image (IndexError in the grayscale mask of its saturation step), which a 1-pixel crop or image reaches.
    That pixel is shifted as a 1 x 2 image of itself, so the result is the transform's own."""

    def apply(self, img: np.ndarray, hue_shift: int, sat_shift: int, val_shift: int, **params: Any) -> np.ndarray:
        if img.shape[0] * img.shape[1] == 1:
            doubled = np.concatenate([img, img], axis=1)
            return super().apply(doubled, hue_shift, sat_shift, val_shift, **params)[:, :1]
        return super().apply(img, hue_shift, sat_shift, val_shift, **params)


def train_transforms(
    crop_size: Size = 512,
    base_size: int = 520,
    scale_range: Tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip: bool = True,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> SegmentationTransform:
    """The training pipeline (see the module docstring)."""
    steps = [RandomRescaleCrop(base_size, crop_size, scale_range, cat_max_ratio)]
    if flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if photometric:
        # mmsegmentation's PhotoMetricDistortion in spirit: brightness +-32/255, contrast 0.5-1.5, hue and
        # saturation shifts, each applied half the time; all LUT-based on uint8, so cheap.
        steps.append(A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.5, p=0.5))
        steps.append(HueSaturationShift(hue_shift_limit=18, sat_shift_limit=30, val_shift_limit=0, p=0.5))
    return SegmentationTransform(A.Compose(steps), mean, std)


def eval_transforms(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> SegmentationTransform:
    """Evaluation: full resolution, normalisation only."""
    return SegmentationTransform(A.Compose([]), mean, std)
