"""A custom dataset from folders: ``images/<split>/``, ``masks/<split>/`` and ``classes.txt``.

Layout under the root::

    classes.txt            one class per line, in train-id order: "name" or "name R G B" (palette colour)
    images/train/**.jpg|png|...
    masks/train/**.png     single-channel or palette PNGs holding class indices 0..N-1, 255 = ignore
    images/val/ ...        (and masks/val/, images/test/ ...)

Images and masks pair by their path relative to the split folder, without extension, compared in Unicode NFC:
``café.jpg`` written on Linux (NFC) pairs with ``café.png`` copied from macOS (decomposed, NFD).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .base import (
    IGNORE_INDEX,
    SegmentationDataset,
    check_split,
    label_lookup,
    pair_by_stem,
    require_split_dirs,
    resolve_root,
)
from .io import IMAGE_SUFFIXES, DataError, list_files
from .registry import DATASETS

LAYOUT = "classes.txt, images/<split>/ and masks/<split>/ (see datasets/README.md)"


def read_class_list(path: Path) -> Tuple[List[str], Optional[List[Tuple[int, int, int]]]]:
    """Class names (and colours, if every line gives one) from a class-list file."""
    if not path.is_file():
        raise DataError(f"{path}: class list not found; expected one class name per line")
    names, colours = [], []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=3)
        if len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts[1:]):
            names.append(parts[0])
            colours.append(tuple(int(p) for p in parts[1:]))
        else:
            names.append(line)
    if not names:
        raise DataError(f"{path}: no class names; expected one class name per line")
    if len(names) >= IGNORE_INDEX:
        raise DataError(f"{path}: {len(names)} classes; at most {IGNORE_INDEX - 1} are supported (255 = ignore)")
    return names, (colours if len(colours) == len(names) else None)


def pairing_key(top: Path) -> Callable[[Path], str]:
    """The key that pairs a file under ``top``: its relative path without extension, in Unicode NFC."""
    return lambda path: unicodedata.normalize("NFC", str(path.relative_to(top).with_suffix("")))


@DATASETS.register
def folder(split: str = "train", root=None, transforms=None, allow_unpaired: bool = False) -> SegmentationDataset:
    """Any dataset laid out as images/<split>, masks/<split> and classes.txt."""
    check_split(split)
    base = resolve_root("folder", root, LAYOUT)
    classes, palette = read_class_list(base / "classes.txt")
    images_dir, masks_dir = base / "images" / split, base / "masks" / split
    require_split_dirs("folder", split, LAYOUT, images_dir, masks_dir)
    samples, problems = pair_by_stem(
        list_files(images_dir, IMAGE_SUFFIXES), list_files(masks_dir, (".png",)),
        pairing_key(images_dir), pairing_key(masks_dir), f"folder {split} ({base})", allow_unpaired,
    )
    table = label_lookup(256, {**{value: value for value in range(len(classes))}, IGNORE_INDEX: IGNORE_INDEX})
    return SegmentationDataset(
        base.name, split, samples, classes, table, palette, transforms,
        f"0..{len(classes) - 1} for {len(classes)} classes and {IGNORE_INDEX} (ignore)", problems,
    )
