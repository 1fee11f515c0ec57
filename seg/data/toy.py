"""``toy``: a built-in synthetic dataset, generated deterministically in memory (no files, no download).

Discs, boxes and stripes in class colours (jittered) on smooth textured backgrounds with noise: easy enough to
learn in a minute on a CPU, varied enough that a model must use shape and colour. The default dataset for
demos and tests.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .base import Sample, SampleDict, SegmentationDataset, check_split, label_lookup
from .registry import DATASETS

CLASSES = ("background", "disc", "box", "stripe")
PALETTE = ((0, 0, 0), (220, 60, 50), (40, 70, 200), (240, 230, 70))
SPLIT_SIZES = {"train": 96, "val": 24, "test": 24}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def toy_scene(height: int, width: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic (image (H, W, 3) uint8 RGB, mask (H, W) uint8 class ids) pair, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    period = rng.uniform(6, 16, 3)
    image = np.empty((height, width, 3), dtype=np.float32)
    image[..., 0] = 100 + 40 * np.sin(xx / period[0] + phase[0])
    image[..., 1] = 120 + 35 * np.cos(yy / period[1] + phase[1])
    image[..., 2] = 110 + 30 * np.sin((xx + yy) / period[2] + phase[2])
    mask = np.zeros((height, width), dtype=np.uint8)
    side = min(height, width)
    for _ in range(rng.integers(2, 5)):
        kind = int(rng.integers(1, len(CLASSES)))
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        size = rng.uniform(0.1, 0.25) * side
        if kind == 1:
            region = (yy - cy) ** 2 + (xx - cx) ** 2 < size**2
        elif kind == 2:
            region = (np.abs(yy - cy) < size) & (np.abs(xx - cx) < size * rng.uniform(0.6, 1.4))
        else:
            angle = rng.uniform(0, np.pi)
            region = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)) < size * 0.25
        colour = np.clip(np.array(PALETTE[kind], np.float32) + rng.normal(0, 15, 3), 0, 255)
        image[region] = colour
        mask[region] = kind
    image += rng.normal(0, 10, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask


class ToyDataset(SegmentationDataset):
    """Samples are generated on access from (split, index); ``path`` is ``toy://<split>/<index>``."""

    def __init__(self, split: str, size: Tuple[int, int], length: int, transforms=None) -> None:
        samples = [Sample(f"toy://{split}/{i:04d}", None) for i in range(length)]  # type: ignore[arg-type]
        table = label_lookup(256, {value: value for value in range(len(CLASSES))})
        super().__init__("toy", split, samples, CLASSES, table, np.array(PALETTE, np.uint8), transforms)
        self.size = size
        self.seed_base = SPLIT_SEEDS[split] * 1_000_003

    def load(self, index: int) -> SampleDict:
        image, mask = toy_scene(*self.size, seed=self.seed_base + index)
        return {"image": image, "mask": mask, "path": str(self.samples[index].image)}


@DATASETS.register
def toy(split: str = "train", root=None, transforms=None, size: Tuple[int, int] = (128, 128), length: int = 0,
        allow_unpaired: bool = False) -> SegmentationDataset:
    """The built-in synthetic dataset (``root`` is ignored): 96 train, 24 val, 24 test images of ``size``."""
    check_split(split)
    return ToyDataset(split, tuple(size), length or SPLIT_SIZES[split], transforms)
