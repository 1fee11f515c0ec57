"""Class weights for the loss: median frequency balancing from a training split's masks, cached, or read from a
file.

Median frequency balancing (Eigen & Fergus 2015; SegNet's CamVid setting) weighs class ``c`` by
``median(freq) / freq(c)``, where ``freq(c)`` is the class's pixels over the pixels of the images it appears in.
Thin classes (pole, sign, pedestrian on CamVid) get weights of 5-10, sky and road below 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .base import IGNORE_INDEX, SegmentationDataset
from .io import DataError, read_mask

CACHE_VARIABLE = "SEG_CACHE_DIR"


def cache_dir() -> Path:
    """Where computed weights are kept: ``$SEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/seg``, else ``~/.cache/seg``."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "seg"


def pixel_statistics(dataset: SegmentationDataset, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Per class: (pixels of the class, pixels of the images containing it), both (C,) int64; ignore excluded."""
    n = dataset.num_classes
    class_pixels = np.zeros(n, dtype=np.int64)
    image_pixels = np.zeros(n, dtype=np.int64)
    for index in tqdm(range(len(dataset)), desc="class frequencies", unit="mask", disable=not progress,
                      leave=False):
        sample = dataset.samples[index] if hasattr(dataset, "samples") else None
        if sample is not None and sample.mask is not None:
            mask = dataset.encode_mask(read_mask(sample.mask), sample.mask)
        else:
            mask = dataset.load(index)["mask"]
        if mask is None:
            raise DataError(f"{dataset.name} {dataset.split}: image {index} has no mask; class weights need labels")
        counts = np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=n)[:n]
        class_pixels += counts
        image_pixels[counts > 0] += int((mask != IGNORE_INDEX).sum())
    return class_pixels, image_pixels


def median_frequency_weights(class_pixels: Sequence[int], image_pixels: Sequence[int]) -> List[float]:
    """``median(freq) / freq(c)`` with ``freq(c) = class_pixels[c] / image_pixels[c]``; 1.0 for an absent class."""
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    image_pixels = np.asarray(image_pixels, dtype=np.float64)
    present = class_pixels > 0
    if not present.any():
        raise DataError("class weights: the training masks contain no labelled pixel")
    frequency = np.divide(class_pixels, image_pixels, out=np.zeros_like(class_pixels), where=present)
    median = float(np.median(frequency[present]))
    return [median / f if p else 1.0 for f, p in zip(frequency, present)]


def _cache_key(dataset: SegmentationDataset) -> Optional[str]:
    """A digest of the split's mask files (paths, sizes, times), or None for data without files (toy)."""
    masks = [s.mask for s in getattr(dataset, "samples", []) if s.mask is not None]
    if not masks or len(masks) != len(dataset):
        return None
    digest = hashlib.sha256(f"{dataset.name}/{dataset.split}/{dataset.num_classes}".encode())
    for path in masks:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def automatic_class_weights(dataset: SegmentationDataset, progress: bool = False) -> Tuple[List[float], str]:
    """Median frequency weights of ``dataset`` (a training split), computed once per set of mask files and cached
    in :func:`cache_dir`. Returns the weights and where they came from (the cache file, or "computed")."""
    key = _cache_key(dataset)
    path = cache_dir() / "class_weights" / f"{dataset.name}_{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            weights = json.loads(path.read_text())["weights"]
            if len(weights) == dataset.num_classes:
                return [float(w) for w in weights], str(path)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed and rewritten
    weights = median_frequency_weights(*pixel_statistics(dataset, progress))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps({"dataset": dataset.name, "classes": list(dataset.classes),
                                           "weights": weights, "method": "median frequency balancing"}))
            os.replace(partial, path)  # atomic: concurrent processes write the same numbers
        except OSError:
            return weights, "computed (cache not writable)"
        return weights, f"computed, cached in {path}"
    return weights, "computed"


def read_class_weights(path: Path, classes: Sequence[str]) -> List[float]:
    """Weights from a file: a JSON list, a JSON object {class name: weight} naming every class, or plain text of
    whitespace-separated numbers, one per class in train-id order."""
    label = f"class weights file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{label}: not found; expected 'auto' or a file of {len(classes)} weights") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{label}: cannot read it ({error})") from None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [float(part) for part in text.split()]
        except ValueError:
            raise DataError(f"{label}: expected JSON or whitespace-separated numbers") from None
    if isinstance(data, dict):
        missing = [c for c in classes if c not in data]
        unknown = [k for k in data if k not in classes]
        if missing or unknown:
            raise DataError(f"{label}: names must be exactly the classes; missing {missing}, unknown {unknown}")
        data = [data[c] for c in classes]
    if not isinstance(data, list) or len(data) != len(classes):
        count = len(data) if isinstance(data, list) else type(data).__name__
        raise DataError(f"{label}: expected {len(classes)} weights (one per class), got {count}")
    try:
        weights = [float(w) for w in data]
    except (TypeError, ValueError):
        raise DataError(f"{label}: every weight must be a number") from None
    if any(not (math.isfinite(w) and w >= 0) for w in weights) or not any(w > 0 for w in weights):
        raise DataError(f"{label}: weights must be finite, >= 0 and not all 0")
    return weights


def resolve_class_weights(setting: Optional[str], dataset: SegmentationDataset,
                          progress: bool = False) -> Tuple[Optional[List[float]], str]:
    """``None`` -> (None, "none"); ``"auto"`` -> :func:`automatic_class_weights`; else a file's weights."""
    if setting is None or setting == "none":
        return None, "none"
    if setting == "auto":
        return automatic_class_weights(dataset, progress)
    return read_class_weights(Path(setting), dataset.classes), setting
