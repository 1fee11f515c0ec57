"""Training-pipeline throughput on the real samples, one CPU core: ``python bench/data_pipeline.py``.

For each dataset it times, over the same files: decoding alone (the floor), ``seg``'s train pipeline (decode +
rescale/pad/crop + flip + photometric distortion + normalisation + tensors), and the same recipe written the
usual albumentations way (rescale the whole image, pad, then crop) as the reference. It prints a table with
images/second and the ratios, and ``--json`` writes the numbers. Targets (bench/RESULTS.md): ADE20K at crop 512
>= 250 images/s per core; Cityscapes 2048x1024 at crop 768 >= 70 % of the bare decode rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import albumentations as A
import cv2
import torch

from seg.data import build_dataset, read_image, train_transforms
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CASES = (
    # name, dataset, split, base size, crop
    ("ADE20K 683x512 JPEG, crop 512", "ade20k", "val", 512, 512),
    ("Cityscapes 2048x1024 PNG, crop 768", "cityscapes", "train", 2048, 768),
)


def reference_pipeline(base_size: int, crop: int) -> A.Compose:
    """The recipe as usually written with albumentations: the whole image is rescaled before the crop (and
    without seg's crop retry against one-class windows, which only adds work to seg's side)."""
    return A.Compose([
        A.LongestMaxSize(max_size=(base_size // 2, base_size * 2)),
        A.PadIfNeeded(crop, crop, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=255),
        A.RandomCrop(crop, crop),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.5, p=0.5),
        A.HueSaturationValue(hue_shift_limit=18, sat_shift_limit=30, val_shift_limit=0, p=0.5),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        A.ToTensorV2(),
    ])


def rate(step, items, min_seconds: float) -> float:
    """Items per second of ``step(item)`` over repeated passes lasting at least ``min_seconds``."""
    for item in items[:2]:
        step(item)  # warm-up
    count, start = 0, time.perf_counter()
    while True:
        for item in items:
            step(item)
        count += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count / elapsed


def measure(title: str, root: Path, name: str, split: str, base_size: int, crop: int, seconds: float) -> dict:
    """Decode-only, seg (with and without the one-class crop retry) and reference rates on one dataset."""
    def seg_rate(cat_max_ratio: float) -> float:
        transforms = train_transforms(crop_size=crop, base_size=base_size, cat_max_ratio=cat_max_ratio)
        dataset = build_dataset(name, split, root=root, transforms=transforms)
        seeds = iter(range(10**9))
        return rate(lambda i: dataset[(i, next(seeds))], list(range(len(dataset))), seconds)

    dataset = build_dataset(name, split, root=root)
    reference = reference_pipeline(base_size, crop)

    def reference_step(i: int) -> None:
        sample = dataset.load(i)
        out = reference(image=sample["image"], mask=sample["mask"])
        # The same outputs as seg's: a contiguous CHW image (ToTensorV2 returns a transposed view whose copy
        # would otherwise be paid later, in collate) and an int64 mask.
        out["image"].contiguous(), out["mask"].long()

    decode = rate(read_image, [str(s.image) for s in dataset.samples], seconds)
    ours, ours_plain = seg_rate(0.75), seg_rate(1.0)
    theirs = rate(reference_step, list(range(len(dataset))), seconds)
    return {"case": title, "decode_only": decode, "seg": ours, "seg_no_retry": ours_plain,
            "albumentations_reference": theirs, "seg_vs_decode": ours / decode,
            "seg_no_retry_vs_reference": ours_plain / theirs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SEG_SHARED_DATA", DEFAULT_SHARED)),
                        help="folder holding ade20k/ and cityscapes/ samples (default: ../shared/data)")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timing per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: --data {args.data} does not exist; point it at the real samples", file=sys.stderr)
        return 2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    for title, name, split, base_size, crop in CASES:
        rows.append(measure(title, args.data / name, name, split, base_size, crop, args.seconds))

    print(f"train pipeline, images/s on one core (torch {torch.__version__}, OpenCV {cv2.__version__}, "
          f"albumentations {A.__version__})")
    header = (f"| {'case':<36} | {'decode only':>11} | {'seg':>7} | {'seg, no retry':>13} | "
              f"{'albu. reference':>15} | {'seg/decode':>10} | {'no retry/ref':>12} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(f"| {row['case']:<36} | {row['decode_only']:>11.1f} | {row['seg']:>7.1f} | "
              f"{row['seg_no_retry']:>13.1f} | {row['albumentations_reference']:>15.1f} | "
              f"{row['seg_vs_decode']:>10.2f} | {row['seg_no_retry_vs_reference']:>12.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
