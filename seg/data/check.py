"""Scan a whole dataset and report every problem at once: unpaired files, unreadable or truncated files,
image/mask size mismatches, label values outside the dataset's range, and classes that never occur."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np
from tqdm import tqdm

from .base import IGNORE_INDEX, SegmentationDataset
from .io import DataError


@dataclass
class CheckReport:
    """Problems (the dataset cannot be used as it is) and warnings (worth a look), one line each."""

    samples: int
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def check_dataset(dataset: SegmentationDataset, progress: bool = True) -> CheckReport:
    """Load every sample and report what is wrong, file name first.

    Build the dataset with ``allow_unpaired=True`` so unpaired files are listed rather than raised.
    """
    problems = list(dataset.problems)
    pixels = np.zeros(256, dtype=np.int64)
    for index in tqdm(range(len(dataset)), desc=f"checking {dataset.name} {dataset.split}", unit="img",
                      disable=not progress):
        try:
            mask = dataset.load(index)["mask"]
        except DataError as error:
            problems.append(str(error))
            continue
        if mask is not None:
            pixels += np.bincount(mask.ravel(), minlength=256)
    report = CheckReport(len(dataset), problems)
    absent = [name for class_id, name in enumerate(dataset.classes) if pixels[class_id] == 0]
    if absent and pixels.sum() > 0:
        line = f"{dataset.name} {dataset.split}: no pixel of class(es) {', '.join(absent)} in any mask"
        if dataset.num_classes == 2 and pixels[IGNORE_INDEX] > 0:
            # 255 means "ignore" everywhere in seg: 0/255 binary masks would train on background only.
            report.problems.append(
                f"{line}, but {pixels[IGNORE_INDEX]} pixels are {IGNORE_INDEX} (ignore): 0/255 binary masks? "
                f"store the foreground as 1"
            )
        else:
            report.warnings.append(line)
    return report
