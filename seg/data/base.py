"""The dataset contract shared by every adapter: pairs of image and mask files, classes, palette, label mapping.

``dataset[i]`` (no transforms) is ``{"image": (H, W, 3) uint8 RGB, "mask": (H, W) uint8 train ids with
IGNORE_INDEX = 255, "path": image path}``. Adapters only list their files and say how stored label values map
to train ids (a lookup table); reading, validation and augmentation are done here once for all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import Dataset

from .io import DataError, read_image, read_mask

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image and its mask file (None where a split has no labels, e.g. test sets)."""

    image: Path
    mask: Optional[Path]


def label_lookup(num_values: int, mapping: Dict[int, int]) -> np.ndarray:
    """A lookup table from stored mask values to train ids: ``mapping`` entries, -1 (invalid) elsewhere."""
    table = np.full(num_values, -1, dtype=np.int16)
    for stored, train_id in mapping.items():
        table[stored] = train_id
    return table


def default_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the PASCAL VOC bit-interleaved colour map, skipping black."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, colour = index + 1, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette[index] = colour
    return palette


def resolve_root(name: str, root: Union[str, os.PathLike, None], layout: str) -> Path:
    """The dataset folder: ``root``, else ``$SEG_DATA_ROOT/<name>``, else ``./datasets/<name>``.

    Raises DataError naming the path and the expected ``layout`` when it does not exist.
    """
    if root is not None:
        path, origin = Path(root), "the given root"
    elif os.environ.get("SEG_DATA_ROOT"):
        path, origin = Path(os.environ["SEG_DATA_ROOT"]) / name, "$SEG_DATA_ROOT"
    else:
        path, origin = Path("datasets") / name, "the default data root"
    if not path.is_dir():
        raise DataError(
            f"{name} data not found at {path} ({origin}); expected {layout} "
            f"(pass the dataset's folder as root / data_root, or set SEG_DATA_ROOT; see datasets/README.md)"
        )
    return path


class SplitNotFoundError(DataError):
    """The dataset root exists but a folder of the requested split does not."""


def require_split_dirs(name: str, split: str, layout: str, *folders: Path) -> None:
    """Raise SplitNotFoundError naming the first missing split folder and the expected layout."""
    for folder in folders:
        if not folder.is_dir():
            raise SplitNotFoundError(f"{name} {split} split: {folder} does not exist; expected {layout}")


def check_split(split: str, available: Sequence[str] = SPLITS) -> str:
    if split not in available:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(available)}")
    return split


SampleDict = Dict[str, object]
Transform = Callable[..., SampleDict]


class SegmentationDataset(Dataset):
    """A list of samples with the dataset's classes, palette and label mapping.

    Args:
        name, split: for messages and provenance.
        samples: image/mask file pairs in a deterministic (sorted) order.
        classes: class names in train-id order.
        label_table: lookup table from stored mask values to train ids (-1 = invalid value; 255 = ignore).
        palette: (num_classes, 3) uint8 colours.
        transforms: optional callable ``transforms(sample_dict, seed=None) -> sample_dict``.
        describe_labels: what valid stored values are, for error messages.
        problems: files that could not be paired (only with ``allow_unpaired``), for the dataset checker.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        name: str,
        split: str,
        samples: List[Sample],
        classes: Sequence[str],
        label_table: np.ndarray,
        palette: Optional[np.ndarray] = None,
        transforms: Optional[Transform] = None,
        describe_labels: str = "",
        problems: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.split = split
        self.samples = samples
        self.classes: Tuple[str, ...] = tuple(classes)
        self.label_table = label_table
        self.palette = default_palette(len(self.classes)) if palette is None else np.asarray(palette, np.uint8)
        self.transforms = transforms
        self.describe_labels = describe_labels or f"0..{len(self.classes) - 1} and {IGNORE_INDEX} (ignore)"
        self.problems = list(problems)  # unpaired files skipped with allow_unpaired=True
        # Train id -> the dataset's own stored value, for predictions saved for official evaluators.
        self.export_table = np.arange(256, dtype=np.uint8)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        counts = f"{len(self)} samples, {self.num_classes} classes"
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, {counts})"

    def encode_mask(self, stored: np.ndarray, path: Path) -> np.ndarray:
        """Stored mask values -> (H, W) uint8 train ids; DataError naming the file and the offending values."""
        table = self.label_table
        if stored.dtype != np.uint8:
            outside = (stored < 0) | (stored >= len(table))
            if outside.any():
                bad = np.unique(stored[outside])
                raise DataError(self._bad_values_message(path, bad))
        mapped = table[stored]
        invalid = mapped < 0
        if invalid.any():
            raise DataError(self._bad_values_message(path, np.unique(stored[invalid])))
        return mapped.astype(np.uint8)

    def _bad_values_message(self, path: Path, bad: np.ndarray) -> str:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        return f"{path}: label values {shown} are outside {self.name}'s range ({self.describe_labels})"

    def to_stored_ids(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) train ids -> the dataset's own label values (Cityscapes label ids, ADE20K 1..150, ...)."""
        return self.export_table[train_ids.astype(np.uint8)]

    def load(self, index: int) -> SampleDict:
        """The sample as stored: image, train-id mask (None without labels) and image path."""
        sample = self.samples[index]
        image = read_image(sample.image)
        mask = None
        if sample.mask is not None:
            mask = self.encode_mask(read_mask(sample.mask), sample.mask)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image} is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
        return {"image": image, "mask": mask, "path": str(sample.image)}

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> SampleDict:
        """``dataset[i]``, or ``dataset[(i, seed)]`` from a :class:`~seg.data.loader.SeededSampler` so that the
        random augmentation of each sample is reproducible whatever the worker that draws it."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.load(index)
        if self.transforms is not None:
            sample = self.transforms(sample, seed=seed)
        return sample


def pair_by_stem(
    images: Sequence[Path],
    masks: Sequence[Path],
    image_key: Callable[[Path], str],
    mask_key: Callable[[Path], str],
    where: str,
    allow_unpaired: bool = False,
) -> Tuple[List[Sample], List[str]]:
    """Pair image and mask files by key, in image-path order.

    Returns the pairs and one problem line per image without a mask and per mask without an image. Unless
    ``allow_unpaired`` (used by the dataset checker to report everything at once), any such file raises a
    DataError that counts them and names the first.
    """
    by_key = {mask_key(m): m for m in masks}
    image_keys = {image_key(i): i for i in images}
    lonely_images = sorted(str(image_keys[k]) for k in image_keys.keys() - by_key.keys())
    lonely_masks = sorted(str(by_key[k]) for k in by_key.keys() - image_keys.keys())
    problems = [f"{path}: image without a mask" for path in lonely_images]
    problems += [f"{path}: mask without an image" for path in lonely_masks]
    if problems and not allow_unpaired:
        summary = []
        if lonely_images:
            summary.append(f"{len(lonely_images)} image(s) without a mask, e.g. {lonely_images[0]}")
        if lonely_masks:
            summary.append(f"{len(lonely_masks)} mask(s) without an image, e.g. {lonely_masks[0]}")
        raise DataError(f"{where}: " + "; ".join(summary))
    paired = sorted(image_keys.keys() & by_key.keys(), key=lambda k: str(image_keys[k]))
    return [Sample(image_keys[k], by_key[k]) for k in paired], problems
