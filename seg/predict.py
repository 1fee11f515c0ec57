"""``python -m seg.predict IMAGES_OR_DIRS... --checkpoint C --out DIR``: masks for images, with a progress bar.

Writes ``<name>.png`` palette masks (pixel values are class ids), and with ``--overlay`` ``<name>_overlay.png``,
with ``--proba`` ``<name>_proba.npy`` (C x H x W float32). An unreadable input is reported by name and skipped;
the exit status is then 1, with a summary at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from seg.data.io import DataError
from seg.engine.checkpoint import CheckpointError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_inputs(paths) -> tuple:
    """(images found, missing paths): folders are searched recursively for image files, in sorted order."""
    images, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            images += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            missing.append(path)
    return images, missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seg.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", type=Path, required=True, help="a seg checkpoint")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--ms-flip", action="store_true", help="multi-scale + flip inference (slower, more accurate)")
    p.add_argument("--overlay", action="store_true", help="also write colour overlays")
    p.add_argument("--proba", action="store_true", help="also write class probabilities as .npy")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)

    images, missing = collect_inputs(args.inputs)
    if not images and not missing:
        p.error("no image files found in the inputs")
    from seg.predictor import Segmenter

    try:
        segmenter = Segmenter.from_checkpoint(args.checkpoint, device=args.device)
        args.out.mkdir(parents=True, exist_ok=True)
    except CheckpointError as error:
        print(f"error: --checkpoint: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: --out {args.out}: cannot create it ({error.strerror})", file=sys.stderr)
        return 2

    failed = [f"{path}: no such file or folder" for path in missing]
    for path in tqdm(images, desc="predict", unit="img"):
        try:
            if args.proba:
                probabilities = segmenter.predict_proba(path, ms_flip=args.ms_flip)
                np.save(args.out / f"{path.stem}_proba.npy", probabilities)
                mask = probabilities.argmax(0).astype(np.uint8)
            else:
                mask = segmenter.predict(path, ms_flip=args.ms_flip)
            segmenter.save_mask(mask, args.out / f"{path.stem}.png")
            if args.overlay:
                segmenter.overlay(path, mask).save(args.out / f"{path.stem}_overlay.png")
        except DataError as error:
            failed.append(str(error))
            tqdm.write(f"skipped {error}", file=sys.stderr)
    done = len(images) - sum(1 for line in failed if not line.endswith("no such file or folder"))
    print(f"wrote {done} mask(s) to {args.out}" + (f"; {len(failed)} input(s) failed:" if failed else ""))
    for line in failed:
        print(f"  {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
