"""Pictures a user reads to judge a run, plus the mask colouring used on the inference path.

* ``save_training_curves``: loss (raw and smoothed), learning rate and validation mIoU against iteration.
* ``save_per_class_iou``: one bar per class with the mIoU marked, to see which classes drag the mean down.
* ``save_confusion_matrix``: the row-normalised confusion matrix, to see which classes are mistaken for which.
* ``save_prediction_panels``: image | ground truth | prediction side by side with a legend of the classes shown.
* ``colorize`` / ``overlay``: masks to RGB with Pillow and numpy only (inference must not pay for matplotlib).

matplotlib is imported inside the drawing functions and only through ``Figure`` and the Agg canvas, never
``pyplot``: importing this module costs nothing, and drawing leaves the user's backend and pyplot state alone.
Every ``save_*`` function creates the output's parent folder and returns the ``Figure`` it wrote.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

Series = Sequence[Tuple[float, float]]

# The panels every curve picture has, even before their first value, so its layout stays the same all run.
_STANDARD_SERIES = {"loss": "loss", "lr": "learning rate", "val mIoU": "val mIoU (%)"}
_DPI = 100


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_colour=(0, 0, 0)) -> Image.Image:
    """(H, W) train ids -> RGB image with ``palette`` (C, 3) colours (ignore and unknown ids in ``ignore_colour``)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = ignore_colour
    table[: len(palette)] = palette
    return Image.fromarray(table[mask.astype(np.uint8)])


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The (H, W, 3) uint8 image with the coloured (H, W) mask blended over it."""
    colours = np.asarray(colorize(mask, palette), dtype=np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """Debiased exponential moving average, as TensorBoard smooths scalars; len(values) in, len(values) out.

    Dividing by ``1 - weight ** n`` removes the pull towards the zero start, so the first output equals the
    first input and a constant input stays constant. Non-finite values pass through without entering the average.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    smoothed, last, count = [], 0.0, 0
    for value in values:
        value = float(value)
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        smoothed.append(last / (1 - weight**count))
    return smoothed


def row_normalised(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """(C, C) counts -> (C, C) float64 where each row sums to 1; a row with no pixels stays all zeros."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def present_classes(*masks: Optional[np.ndarray], num_classes: int, ignore_index: int = 255) -> List[int]:
    """Sorted class ids in [0, num_classes) that occur in any of the (H, W) masks (None masks are skipped)."""
    found = set()
    for mask in masks:
        if mask is not None:
            found.update(int(i) for i in np.unique(mask))
    return sorted(i for i in found if 0 <= i < num_classes and i != ignore_index)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself; an explicit Agg canvas means no backend lookup at save time
    return figure


def _save(figure, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI)


def _no_data(ax, text: str = "no data yet") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=12)


def save_training_curves(history: Mapping[str, Series], path, smoothing: float = 0.9):
    """One panel per series, sharing the iteration axis: "loss", "lr", "val mIoU" first, then any other keys.

    ``history`` maps a name to a list of (iteration, value) pairs; "val mIoU" values are fractions in [0, 1]
    and are drawn in percent. The loss is drawn raw (faint) and smoothed with :func:`smooth` (``smoothing``).
    Non-finite points are skipped; a missing or empty series shows "no data yet".
    """
    names = list(_STANDARD_SERIES) + [name for name in history if name not in _STANDARD_SERIES]
    figure = _figure(8, 2.2 * len(names) + 0.6)
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    last_iteration = -math.inf
    for ax, name in zip(axes, names):
        points = [(float(x), float(y)) for x, y in history.get(name, ()) if math.isfinite(x) and math.isfinite(y)]
        ax.set_ylabel(_STANDARD_SERIES.get(name, name))
        ax.grid(True, alpha=0.3)
        if not points:
            _no_data(ax)
            ax.set_yticks([])  # the default 0-1 scale would read as data
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        last_iteration = max(last_iteration, max(xs))
        if name == "loss":
            ax.plot(xs, ys, color="C0", alpha=0.3, linewidth=0.8, label="raw")
            ax.plot(xs, smooth(ys, smoothing), color="C0", linewidth=1.8, label=f"smoothed ({smoothing:g})")
            ax.legend(loc="upper right")
        elif name == "val mIoU":
            percent = [100 * y for y in ys]
            ax.plot(xs, percent, color="C2", marker="o", markersize=4)
            ax.margins(y=0.15)  # headroom for the "best" label
            best = int(np.argmax(percent))
            ax.annotate(f"best {percent[best]:.1f}", (xs[best], percent[best]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        else:
            # A lone point would be invisible as a line.
            ax.plot(xs, ys, color="C1", marker="o" if len(points) == 1 else None)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    axes[-1].set_xlabel("iteration")
    suffix = f" (iteration {last_iteration:.0f})" if math.isfinite(last_iteration) else ""
    figure.suptitle(f"training curves{suffix}")
    _save(figure, path)
    return figure


def save_per_class_iou(per_class_iou: Mapping[str, float], path, title: Optional[str] = None):
    """Horizontal bars of IoU (fractions, drawn in percent) per class in the mapping's (dataset) order.

    NaN (class absent from both ground truth and prediction) is labelled "n/a" without a bar; the dashed line is
    the mean over the other classes, the same convention as ``mIoU`` in :mod:`seg.engine.metrics`.
    """
    names = [str(name) for name in per_class_iou]
    percent = 100 * np.asarray([float(v) for v in per_class_iou.values()], dtype=np.float64)
    # About a quarter inch per bar keeps 150 ADE20K names readable instead of squeezing them together.
    figure = _figure(7, max(2.5, 0.25 * len(names) + 1.2))
    ax = figure.subplots()
    ax.set_title(title or "per-class IoU")
    ax.set_xlabel("IoU (%)")
    ax.set_xlim(0, 100)
    if not names:
        _no_data(ax, "no classes")
        _save(figure, path)
        return figure
    positions = np.arange(len(names))
    finite = np.isfinite(percent)
    ax.barh(positions[finite], percent[finite], color="C0")
    ax.set_yticks(positions, names, fontsize=8 if len(names) > 40 else 10)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first class at the top, as datasets list them
    for y, value in zip(positions, percent):
        if not math.isfinite(value):
            ax.text(1, y, "n/a", va="center", color="0.5", fontsize=8)
        elif value > 88:  # no room right of the bar inside the 0-100 axis
            ax.text(value - 1, y, f"{value:.1f}", va="center", ha="right", color="white", fontsize=8)
        else:
            ax.text(value + 1, y, f"{value:.1f}", va="center", fontsize=8)
    if finite.any():
        mean = float(percent[finite].mean())
        ax.axvline(mean, color="k", linestyle="--", linewidth=1, label=f"mIoU {mean:.1f}")
        # Above the bars rather than inside them: with 150 classes the bottom of the picture is far away.
        figure.legend(loc="outside upper right", frameon=False)
    _save(figure, path)
    return figure


def save_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path):
    """Heat map of the (C, C) confusion counts normalised by :func:`row_normalised` (rows = ground truth,
    columns = prediction), with the percentages written in the cells when C <= 20."""
    normalised = row_normalised(matrix)
    n = len(class_names)
    if normalised.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {normalised.shape} does not match {n} class names")
    side = min(30.0, 3 + 0.4 * n)
    figure = _figure(side + 1.5, side)
    ax = figure.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=ax, label="fraction of ground-truth pixels", shrink=0.8)
    # Beyond 60 classes every label would overlap its neighbours; every k-th one still lets a reader find rows.
    step = 1 if n <= 60 else math.ceil(n / 50)
    ticks = list(range(0, n, step))
    labels = [str(class_names[i]) for i in ticks]
    fontsize = 10 if n <= 20 else 7
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (row-normalised)")
    if n <= 20:
        for (row, column), value in np.ndenumerate(normalised):
            percent = 100 * value
            text = f"{percent:.0f}" if percent >= 10 or percent == 0 else f"{percent:.1f}"
            ax.text(column, row, text, ha="center", va="center", fontsize=8,
                    color="white" if value > 0.5 else "black")
    _save(figure, path)
    return figure


def save_prediction_panels(image: np.ndarray, prediction: np.ndarray, palette: np.ndarray,
                           class_names: Sequence[str], path, ground_truth: Optional[np.ndarray] = None,
                           ignore_index: int = 255, title: Optional[str] = None):
    """image | ground truth (if given) | prediction, with a legend of the classes present in either mask.

    ``image`` is (H, W, 3) uint8 RGB, ``prediction`` and ``ground_truth`` are (H, W) integer class ids,
    ``palette`` is (C, 3) uint8 and ``class_names`` has C names. Ignore pixels are black, named "ignore".
    """
    from matplotlib.patches import Patch

    palette = np.asarray(palette, dtype=np.uint8)
    panels = [("image", np.asarray(image))]
    if ground_truth is not None:
        panels.append(("ground truth", np.asarray(colorize(ground_truth, palette))))
    panels.append(("prediction", np.asarray(colorize(prediction, palette))))
    height, width = np.asarray(image).shape[:2]
    panel_height = 4.0
    panel_width = panel_height * width / max(height, 1)
    shown = present_classes(ground_truth, prediction, num_classes=len(class_names), ignore_index=ignore_index)
    handles = [Patch(facecolor=palette[i] / 255, edgecolor="0.3", label=str(class_names[i])) for i in shown]
    if any(mask is not None and np.any(mask == ignore_index) for mask in (ground_truth, prediction)):
        handles.append(Patch(facecolor="black", edgecolor="0.3", label="ignore"))
    columns = max(1, math.ceil(len(handles) / 20))  # long legends wrap rather than run off the figure
    figure = _figure(len(panels) * panel_width + 1.8 * columns, panel_height + 0.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, picture) in zip(axes, panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    if handles:
        figure.legend(handles=handles, loc="outside right upper", ncols=columns, fontsize=8, frameon=False)
    if title:
        figure.suptitle(title)
    _save(figure, path)
    return figure
