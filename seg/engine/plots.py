"""Pictures of a run, drawn with Pillow alone: training curves and prediction overlays."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

Series = Sequence[Tuple[float, float]]


def _panel(draw: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], title: str, series: Series, colour) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text((left + 6, top + 4), title, fill=(0, 0, 0))
    points = [(x, y) for x, y in series if math.isfinite(y)]
    if not points:
        draw.text((left + 6, top + 20), "no data yet", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-9
    inner = (left + 40, top + 22, right - 10, bottom - 18)

    def to_pixel(x: float, y: float) -> Tuple[float, float]:
        u = inner[0] + (x - x0) / (x1 - x0) * (inner[2] - inner[0])
        v = inner[3] - (y - y0) / (y1 - y0) * (inner[3] - inner[1])
        return u, v

    draw.text((left + 4, inner[1] - 2), f"{y1:.3g}", fill=(90, 90, 90))
    draw.text((left + 4, inner[3] - 10), f"{y0:.3g}", fill=(90, 90, 90))
    draw.text((inner[0], bottom - 14), f"iter {x0:.0f}", fill=(90, 90, 90))
    draw.text((inner[2] - 60, bottom - 14), f"iter {x1:.0f}", fill=(90, 90, 90))
    pixels = [to_pixel(x, y) for x, y in points]
    if len(pixels) == 1:
        u, v = pixels[0]
        draw.ellipse((u - 3, v - 3, u + 3, v + 3), fill=colour)
    else:
        draw.line(pixels, fill=colour, width=2)


def save_training_curves(history: Dict[str, List[Tuple[float, float]]], path: Path) -> None:
    """A PNG with one panel per series (e.g. loss, lr, mIoU), each a list of (iteration, value)."""
    names = list(history)
    width, panel_height = 640, 200
    image = Image.new("RGB", (width, panel_height * max(1, len(names))), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    for index, name in enumerate(names):
        box = (4, index * panel_height + 4, width - 4, (index + 1) * panel_height - 4)
        _panel(draw, box, name, history[name], colours[index % len(colours)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_colour=(0, 0, 0)) -> Image.Image:
    """(H, W) train ids -> RGB image with ``palette`` colours (ignore and unknown ids in ``ignore_colour``)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = ignore_colour
    table[: len(palette)] = palette
    return Image.fromarray(table[mask.astype(np.uint8)])


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with the coloured mask blended over it."""
    colours = np.asarray(colorize(mask, palette), dtype=np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def save_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> None:
    """A PNG heat map of the row-normalised confusion matrix (rows = ground truth, columns = prediction), with
    class names along the left edge when there are few enough to read."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    n = len(class_names)
    cell = max(4, min(40, 800 // max(n, 1)))
    label_width = 110 if n <= 40 else 0
    size = n * cell
    image = Image.new("RGB", (label_width + size + 2, size + 24), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((label_width, 4), "confusion (rows: ground truth, columns: prediction)", fill=(0, 0, 0))
    shade = (255 * (1 - normalised)).astype(np.uint8)
    heat = np.stack([shade, shade, np.full_like(shade, 255)], axis=-1)  # white -> blue
    heat_image = Image.fromarray(heat).resize((size, size), Image.NEAREST)
    image.paste(heat_image, (label_width, 20))
    if label_width:
        for index, name in enumerate(class_names):
            draw.text((2, 20 + index * cell + max(0, (cell - 10) // 2)), str(name)[:16], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
