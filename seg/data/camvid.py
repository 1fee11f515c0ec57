"""CamVid, SegNet release: 11 classes, stored 0..10, 11 (void) -> ignore; 367 train / 101 val / 233 test."""

from __future__ import annotations

from .base import (
    IGNORE_INDEX,
    SegmentationDataset,
    check_split,
    label_lookup,
    pair_by_stem,
    require_split_dirs,
    resolve_root,
)
from .io import list_files
from .registry import DATASETS

LAYOUT = "train/, trainannot/, val/, valannot/, test/, testannot/ holding same-named PNGs"
CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)


@DATASETS.register
def camvid(split: str = "train", root=None, transforms=None, allow_unpaired: bool = False) -> SegmentationDataset:
    """CamVid (SegNet layout): ``train``, ``val``, ``test``."""
    check_split(split)
    base = resolve_root("camvid", root, LAYOUT)
    images_dir, masks_dir = base / split, base / f"{split}annot"
    require_split_dirs("camvid", split, LAYOUT, images_dir, masks_dir)
    samples, problems = pair_by_stem(
        list_files(images_dir, (".png",)), list_files(masks_dir, (".png",)),
        lambda p: p.stem, lambda p: p.stem, f"camvid {split} ({base})", allow_unpaired,
    )
    table = label_lookup(256, {**{value: value for value in range(11)}, 11: IGNORE_INDEX})
    return SegmentationDataset(
        "camvid", split, samples, CLASSES, table, PALETTE, transforms, "0..10 and 11 (void, ignored)", problems
    )
