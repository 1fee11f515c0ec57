"""A predicted mask as the service returns it: a palette PNG, an overlay PNG, or JSON with per-class pixel shares
and Hugging Face-style segments (``[{label, score, mask}]`` as the ``image-segmentation`` pipeline gives them,
each mask a base64 PNG)."""

from __future__ import annotations

import base64
import io
from typing import Any, Dict, List

import numpy as np
from PIL import Image

from seg.predictor import Segmenter

__all__ = ["mask_json", "mask_png", "overlay_png", "png_bytes"]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # masks compress well even at the fastest level
    return buffer.getvalue()


def mask_png(segmenter: Segmenter, mask: np.ndarray) -> bytes:
    """The (H, W) class-id mask as a palette PNG: pixel values are class ids, viewers show the palette."""
    return png_bytes(segmenter.mask_image(mask))


def overlay_png(segmenter: Segmenter, rgb: np.ndarray, mask: np.ndarray, alpha: float) -> bytes:
    return png_bytes(segmenter.overlay(rgb, mask, alpha))


def _base64_png(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def mask_json(segmenter: Segmenter, mask: np.ndarray) -> Dict[str, Any]:
    """``{"width", "height", "classes": [{"id", "label", "color", "share"}], "segments": [{"label", "score",
    "mask"}], "mask"}`` for the predicted classes, the largest first.

    ``share`` is the class's fraction of the image's pixels. ``score`` is the same fraction: Hugging Face's
    semantic-segmentation pipeline leaves it null, and a number keeps clients that sort by it working. Each
    segment's ``mask`` is a base64 grayscale PNG, 255 where the class is; ``mask`` is the palette PNG of class ids.
    """
    counts = np.bincount(mask.ravel(), minlength=segmenter.num_classes)
    total = float(mask.size)
    present = sorted(np.flatnonzero(counts), key=lambda index: (-counts[index], index))
    classes: List[Dict[str, Any]] = []
    segments: List[Dict[str, Any]] = []
    for index in present:
        index = int(index)
        label = segmenter.classes[index] if index < segmenter.num_classes else str(index)
        share = counts[index] / total
        classes.append({"id": index, "label": label, "color": [int(c) for c in segmenter.palette[index]],
                        "share": share})
        binary = Image.fromarray(np.where(mask == index, 255, 0).astype(np.uint8), mode="L")
        segments.append({"label": label, "score": share, "mask": _base64_png(binary)})
    return {"width": int(mask.shape[1]), "height": int(mask.shape[0]), "classes": classes, "segments": segments,
            "mask": _base64_png(segmenter.mask_image(mask))}
