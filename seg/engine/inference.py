"""Inference modes, one implementation for evaluation, prediction and validation during training.

- ``whole``: the full image in one pass (the model takes any size).
- ``slide``: ``crop x crop`` windows every ``stride`` pixels (default 2/3 crop), the last window flush with the
  border (mmsegmentation's rule, so no window is padded unless the image is smaller than a crop), windows run in
  batches, overlapping probabilities averaged.
- flip: every pass (the whole image, or each slide window) batched with its mirror image, whose probabilities,
  flipped back, are averaged with the pass's own (Encoding's MultiEvalModule flips per window too).
- multi-scale + flip: the image resized so its long side is ``base_size x scale`` for each scale (the image's own
  long side when ``base_size`` is None), each scale's probabilities resized back to the original resolution and
  averaged, argmax at the end.

Probabilities (softmax in float32) rather than Encoding's ``exp(logits)`` sums are averaged, so no logit size
overflows. With one scale 1.0, no base size and no flip, the result is ``whole`` exactly.

Precision: :func:`inference_model` prepares a model for inference (batch norm folded, channels_last) in float32,
bfloat16 or float16; the images are cast to the model's dtype, and the logits come back to float32 before they are
upsampled, so the softmax, the accumulation over windows, flips and scales, and the argmax are float32 whatever
the model computes in. ``InferenceConfig.amp_dtype`` is the other way, autocast over a float32 model (validation
during training, which evaluates the training model itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.config import ConfigError
from seg.models.fusion import fuse_conv_bn
from seg.models.segmentors import Segmentor, upsample_logits

# The datasets' multi-scale evaluation scales (REFERENCE section 2).
MS_SCALES = {
    "ade20k": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    "cityscapes": (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25),
}
# Every other dataset: ADE20K's.
DEFAULT_MS_SCALES = MS_SCALES["ade20k"]


def test_scales_for(dataset: str) -> Tuple[float, ...]:
    """The multi-scale + flip evaluation scales of ``dataset`` (multiples of the base size)."""
    return MS_SCALES.get(dataset, DEFAULT_MS_SCALES)


@dataclass(frozen=True)
class InferenceConfig:
    """How to turn an image into class probabilities.

    Attributes:
        mode: ``whole`` or ``slide``.
        crop_size: window side for ``slide``.
        stride: window step for ``slide`` (default 2/3 of the crop).
        scales: resize factors (of ``base_size``, or of the image's long side when it is None).
        flip: add the horizontally flipped view.
        base_size: reference long side for the scales.
        window_batch: images per forward pass in ``slide`` (windows x views, a mirror image counting as one).
        amp_dtype: autocast dtype (bf16/fp16) or None.
    """

    mode: str = "whole"
    crop_size: int = 512
    stride: Optional[int] = None
    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    base_size: Optional[int] = None
    window_batch: int = 4
    amp_dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ConfigError("mode", f"must be whole or slide, got {self.mode!r}")
        if self.crop_size <= 0:
            raise ConfigError("crop_size", f"must be positive, got {self.crop_size}")
        if self.stride is not None and not 0 < self.stride <= self.crop_size:
            raise ConfigError("stride", f"must be in 1..crop size ({self.crop_size}), got {self.stride}")
        if not self.scales or any(not (s > 0 and math.isfinite(s)) for s in self.scales):
            raise ConfigError("scales", f"must be positive numbers, got {list(self.scales)}")
        if self.window_batch < 1:
            raise ConfigError("window_batch", f"must be positive, got {self.window_batch}")

    @property
    def views(self) -> int:
        """Views averaged per window: the window itself and, with ``flip``, its mirror image."""
        return 2 if self.flip else 1

    @property
    def window_stride(self) -> int:
        """The step between slide windows: ``stride``, or 2/3 of the crop by default."""
        return self.stride or max(1, (2 * self.crop_size) // 3)


def class_probabilities(logits: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Softmax over the class axis of (N, C, H, W) logits, in float32 and in the logits' own memory format.

    For channels_last logits the classes are the innermost axis in memory, so the softmax runs over a permuted
    view: ``softmax(dim=1)`` would first copy them to NCHW (about 4x slower on CPU for 150 classes). With
    ``overwrite`` (logits the caller owns, no autograd) a channels_last softmax is written over the logits: the
    kernel finishes each pixel's classes before the next, and skipping a fresh output buffer (600 MB for four
    512x512 windows of 150 classes, page-faulted in on every pass) halves the softmax's time.
    """
    owned = logits.dtype != torch.float32  # .float() below makes a private copy
    logits = logits.float()
    if logits.dim() == 4 and not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last):
        classes_last = logits.permute(0, 2, 3, 1)
        if (overwrite or owned) and not (torch.is_grad_enabled() and logits.requires_grad):
            torch.ops.aten._softmax.out(classes_last, -1, False, out=classes_last)
            return logits
        return classes_last.softmax(dim=-1).permute(0, 3, 1, 2)
    return logits.softmax(dim=1)


def inference_model(model: nn.Module, device: Union[str, torch.device], dtype: torch.dtype = torch.float32,
                    inplace: bool = False) -> nn.Module:
    """``model`` as inference runs it: eval mode, batch norm folded into the convolutions (in float64, before any
    cast), channels_last, on ``device``, its parameters in ``dtype``. A copy, unless ``inplace``.

    In bf16 on the CPU the folded convolutions run as oneDNN's fused bf16 primitives (AMX or AVX-512 BF16) and the
    dilated ones take their measured padding path (:mod:`seg.models.conv`).
    """
    prepared = fuse_conv_bn(model.eval(), inplace=inplace).to(device, memory_format=torch.channels_last)
    return prepared.to(dtype) if dtype != torch.float32 else prepared


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter (float32 for a model without any)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _probabilities(model: nn.Module, images: torch.Tensor, amp_dtype: Optional[torch.dtype],
                   mirrored: int = 0) -> torch.Tensor:
    """(N, 3, H, W) -> (N, C, H, W) float32 probabilities. The last ``mirrored`` images are horizontally flipped
    views: their probabilities come back flipped again, aligned with the unflipped images.

    A :class:`Segmentor` gives its logits before upsampling: the mirrored ones are flipped there (the bilinear
    upsampling commutes with the flip, so the result is the same with 1/64 of the pixels moved), and the
    upsampled logits, made here, can take their softmax in place. Any other model's probabilities are flipped
    at full size. Images are cast to the model's dtype; logits are float32 from the upsampling on.
    """
    segmentor = isinstance(model, Segmentor)
    images = images.to(model_dtype(model))
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if segmentor:
            logits = model.low_res_logits(images).float()
            if mirrored > 0:
                logits[-mirrored:] = logits[-mirrored:].flip(-1)
            logits = upsample_logits(logits, (images.shape[2], images.shape[3]))
        else:
            logits = model(images)
    probabilities = class_probabilities(logits, overwrite=segmentor)
    if mirrored > 0 and not segmentor:
        probabilities[-mirrored:] = probabilities[-mirrored:].flip(-1)
    return probabilities


def _view_sum(model: nn.Module, images: torch.Tensor, config: InferenceConfig) -> torch.Tensor:
    """(N, 3, H, W) -> (N, C, H, W): the images' probabilities plus, with ``config.flip``, those of their mirror
    images flipped back (batched in the same pass). Divide by ``config.views`` for the mean."""
    if not config.flip:
        return _probabilities(model, images, config.amp_dtype)
    n = images.shape[0]
    both = _probabilities(model, torch.cat([images, images.flip(-1)]), config.amp_dtype, mirrored=n)
    return both[:n].add_(both[n:])


def _mean_of_views(summed: torch.Tensor, config: InferenceConfig) -> torch.Tensor:
    return summed.mul_(1.0 / config.views) if config.views > 1 else summed


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Window offsets along one axis: every ``stride``, the last one flush with the end."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    return starts + [length - crop]


def slide_probabilities(model: nn.Module, image: torch.Tensor, config: InferenceConfig) -> torch.Tensor:
    """(N, 3, H, W) -> (N, C, H, W) probabilities from overlapping ``crop x crop`` windows.

    With ``config.flip`` every window's mirror image is batched with it and its probabilities, flipped back,
    are a second view of that window (Encoding's flip: per window, on the image's own window grid).
    """
    n, _, height, width = image.shape
    crop = config.crop_size
    stride = config.window_stride
    # Smaller than a window: pad bottom/right (zeros, i.e. the mean colour after normalisation), crop back later.
    padded = F.pad(image, (0, max(crop - width, 0), 0, max(crop - height, 0)))
    full_h, full_w = padded.shape[2], padded.shape[3]
    boxes = [(y, x) for y in window_starts(full_h, crop, stride) for x in window_starts(full_w, crop, stride)]
    if len(boxes) == 1:  # one window covers the image: nothing to accumulate
        return _mean_of_views(_view_sum(model, padded, config), config)[:, :, :height, :width]
    total = None
    counts = torch.zeros((1, 1, full_h, full_w), device=image.device)
    # window_batch counts images per forward pass: the n images and their mirror images share each chunk.
    per_pass = max(1, config.window_batch // (n * config.views))
    for first in range(0, len(boxes), per_pass):
        chunk = boxes[first : first + per_pass]
        windows = torch.cat([padded[:, :, y : y + crop, x : x + crop] for y, x in chunk])
        probabilities = _view_sum(model, windows, config)
        if total is None:
            # Zeros made directly in the model's output memory format: the window additions below are then plain
            # contiguous passes, and no NCHW buffer is filled and converted first.
            total = torch.empty((n, probabilities.shape[1], full_h, full_w), dtype=probabilities.dtype,
                                device=probabilities.device, memory_format=_memory_format(probabilities)).zero_()
        for index, (y, x) in enumerate(chunk):
            # add_ on the slice, not ``+=``: Python's augmented assignment on an index writes the slice back
            # (a second full pass over the window).
            total[:, :, y : y + crop, x : x + crop].add_(probabilities[index * n : (index + 1) * n])
            counts[:, :, y : y + crop, x : x + crop].add_(1)
    return total.div_(counts.mul_(config.views))[:, :, :height, :width]


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    channels_last = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not tensor.is_contiguous() else torch.contiguous_format


def single_scale_probabilities(model: nn.Module, image: torch.Tensor, config: InferenceConfig) -> torch.Tensor:
    """(N, 3, H, W) -> (N, C, H, W) probabilities, whole or slide, with the mirror images batched in."""
    if config.mode == "slide":
        return slide_probabilities(model, image, config)
    return _mean_of_views(_view_sum(model, image, config), config)


def scaled_size(height: int, width: int, scale: float, base_size: Optional[int] = None) -> Tuple[int, int]:
    """(height, width) of the view at ``scale``: the long side becomes ceil(base_size x scale) (REFERENCE 2),
    base_size defaulting to the image's own long side, the aspect ratio kept."""
    factor = math.ceil((base_size or max(height, width)) * scale) / max(height, width)
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


@torch.no_grad()
def predict_probabilities(model: nn.Module, image: torch.Tensor, config: InferenceConfig) -> torch.Tensor:
    """Class probabilities (N, C, H, W) at the input's resolution for a normalised (N, 3, H, W) batch.

    ``model`` must be in eval mode. Each scale's probabilities are resized back and averaged one scale at a time,
    so memory holds one scale's views plus one (N, C, H, W) float32 sum.
    """
    height, width = image.shape[2], image.shape[3]
    total: Optional[torch.Tensor] = None
    for scale in config.scales:
        size = scaled_size(height, width, scale, config.base_size)
        view = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                    align_corners=True)
        probabilities = single_scale_probabilities(model, view, config)
        if size != (height, width):
            probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=True)
        total = probabilities if total is None else total.add_(probabilities)
    return total.div_(len(config.scales)) if len(config.scales) > 1 else total


@dataclass(frozen=True)
class InferenceOptions:
    """What a caller may ask of inference; ``None`` leaves the choice to the model card.

    ``seg.eval``'s flags, :class:`~seg.Segmenter`'s keyword arguments and the service's query parameters are these
    fields, and :func:`resolve_inference` alone turns them into an :class:`InferenceConfig`, so an option means
    the same everywhere:

    - ``ms_flip``: the card's test scales, flip, sliding windows (the paper's multi-scale + flip evaluation).
    - ``scales``: resize factors of the base size (default: the card's test scales with ``ms_flip``, else 1).
    - ``flip``: add the mirror image (implied by ``ms_flip``).
    - ``mode``: ``whole`` or ``slide`` (default: ``slide`` with ``ms_flip``, else ``whole``).
    - ``crop_size``, ``stride``: slide windows (default: the card's training crop, 2/3 of it).
    - ``base_size``: the long side the scales multiply (default: the card's training base size, the scale the
      model was trained at; :data:`NATIVE`: the image's own long side).
    - ``window_batch``: images per forward pass in ``slide``; ``amp_dtype``: autocast over a float32 model.
    """

    ms_flip: bool = False
    scales: Optional[Tuple[float, ...]] = None
    flip: bool = False
    mode: Optional[str] = None
    crop_size: Optional[int] = None
    stride: Optional[int] = None
    base_size: Optional[int] = None
    window_batch: int = 4
    amp_dtype: Optional[torch.dtype] = None


# ``InferenceOptions.base_size`` that keeps each image at its own size.
NATIVE = 0


def resolve_inference(card, options: InferenceOptions = InferenceOptions()) -> InferenceConfig:
    """The :class:`InferenceConfig` of ``options`` for the model ``card`` (a :class:`~seg.card.ModelCard`)
    describes: the one place where an option's default is decided (see :class:`InferenceOptions`)."""
    if options.scales is not None:
        scales = tuple(options.scales)
    else:
        scales = tuple(card.test_scales) if options.ms_flip else (1.0,)
    base_size = card.base_size if options.base_size is None else (options.base_size or None)
    return InferenceConfig(mode=options.mode or ("slide" if options.ms_flip else "whole"),
                           crop_size=options.crop_size or card.crop_size, stride=options.stride, scales=scales,
                           flip=options.flip or options.ms_flip, base_size=base_size,
                           window_batch=options.window_batch, amp_dtype=options.amp_dtype)


def describe_inference(config: InferenceConfig) -> str:
    """``ms+flip`` for several scales with flip, else ``single-scale`` (the names model cards report)."""
    return "ms+flip" if len(config.scales) > 1 and config.flip else "single-scale"
