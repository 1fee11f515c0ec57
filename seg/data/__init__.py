"""Data: dataset adapters (a registry), decoding, augmentation and loaders.

    >>> from seg.data import build_dataset, train_transforms
    >>> ds = build_dataset("ade20k", "train", root="datasets/ade20k", transforms=train_transforms(480, 520))
"""

from __future__ import annotations

from typing import List

from . import ade20k as _ade20k  # noqa: F401  (each adapter module registers itself)
from . import camvid as _camvid  # noqa: F401
from . import cityscapes as _cityscapes  # noqa: F401
from . import folder as _folder  # noqa: F401
from . import toy as _toy  # noqa: F401
from .base import IGNORE_INDEX, SegmentationDataset
from .io import DataError, read_image, read_mask
from .registry import DATASETS
from .transforms import eval_transforms, train_transforms

__all__ = [
    "DataError",
    "IGNORE_INDEX",
    "SegmentationDataset",
    "build_dataset",
    "eval_transforms",
    "list_datasets",
    "read_image",
    "read_mask",
    "train_transforms",
]


def list_datasets() -> List[str]:
    """Registered dataset names."""
    return DATASETS.names()


def build_dataset(name: str, split: str = "train", root=None, transforms=None, **options) -> SegmentationDataset:
    """Build a registered dataset.

    Args:
        name: ``ade20k``, ``cityscapes``, ``camvid``, ``folder`` or ``toy`` (ValueError listing them otherwise).
        split: ``train``, ``val`` or ``test`` (where the dataset has it).
        root: the dataset's own folder; default ``$SEG_DATA_ROOT/<name>``, else ``./datasets/<name>``.
        transforms: ``transforms(sample, seed=None) -> sample``, e.g. :func:`train_transforms`.
        **options: adapter options (``label_mode`` for Cityscapes, ``allow_unpaired``, ``size`` for toy).

    Returns:
        A dataset whose items are ``{"image", "mask", "path"}`` dicts (numpy arrays without transforms).

    Raises:
        DataError: the root, a split folder or a file is missing or inconsistent (one line naming it).
    """
    return DATASETS.get(name)(split=split, root=root, transforms=transforms, **options)
