"""``python -m seg.predict IMAGES_OR_DIRS... --checkpoint C --out DIR``: masks for images, with a progress bar.

Writes ``<name>.png`` palette masks (pixel values are class ids), and with ``--overlay`` ``<name>_overlay.png``,
with ``--proba`` ``<name>_proba.npy`` (C x H x W float32). An unreadable input, or one above ``--max-pixels``
(checked from its header, before decoding), is reported by name and skipped; the exit status is then 1, with a
summary at the end. Images above 2048 x 2048 pixels are predicted by sliding ``--crop-size`` windows, tile by tile
(see ``seg.predictor``). Usage mistakes (a flag's value, the checkpoint, an unwritable --out, no input image at
all, two inputs with the same name, whose masks would overwrite each other) are one line on stderr, exit
status 2.

Across processes, ``torchrun --nproc_per_node=N -m seg.predict ...`` (each on its own GPU, cuda:LOCAL_RANK, when
there are GPUs; gloo processes on the CPU otherwise) shares the work out: rank r predicts images r, r + N, ... of
the list of inputs (rank 0's listing), so each is predicted once, into the same ``--out``, with the masks of one
process. Every rank checks the arguments alike before any waits for the others, so a usage mistake exits every rank
with status 2. The progress bar is rank 0's share; rank 0 prints one summary of every rank's masks and failed
inputs, and the exit status, 1 if any rank failed an input, is every rank's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from seg.data.io import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, DataError
from seg.card import ModelCardError
from seg.engine.checkpoint import CheckpointError
from seg.hub import HubError
from seg.engine.precision import PRECISIONS
from seg.config import ConfigError
from seg.engine.distributed import init_distributed, object_group, pick_device, shard, shutdown_distributed
from seg.cli import (ArgumentParser, MAX_CROP_SIZE, checkpoint_problem, crop_size_type, flag_message, int_in_range,
                     output_problem, parse_scales)


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


def first_name_clash(images) -> Optional[Tuple[Path, Path]]:
    """Two inputs whose outputs would overwrite each other (same file stem, e.g. ``a/x.png`` and ``b/x.jpg``)."""
    seen: Dict[str, Path] = {}
    for path in images:
        earlier = seen.setdefault(path.stem, path)
        if earlier is not path and earlier.resolve() != path.resolve():  # the same file twice is no clash
            return earlier, path
    return None


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m seg.predict", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("inputs", nargs="+", help="image files or folders")
    add("--checkpoint", type=Path, required=True, help="a seg checkpoint, a shared model folder or a Hub repo id")
    add("--out", type=Path, required=True, help="output folder")
    add("--ms-flip", action="store_true", help="multi-scale + flip inference (slower, more accurate)")
    add("--scales", type=parse_scales, help="comma-separated scales, e.g. 0.75,1.0,1.25 (default with --ms-flip: "
        "the training dataset's)")
    add("--crop-size", type=crop_size_type, help=f"slide window side for --ms-flip and images above 2048 x 2048, "
        f"1 to {MAX_CROP_SIZE} (default: the training crop)")
    add("--max-pixels", type=int_in_range(0), default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels, read from the file header before decoding (default "
             f"{DEFAULT_MAX_PIXELS}; 0: no limit)")
    add("--overlay", action="store_true", help="also write colour overlays")
    add("--proba", action="store_true", help="also write class probabilities as .npy")
    add("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add("--precision", choices=PRECISIONS, default="auto", help="what the model computes in (default auto: bf16 on "
        "CPUs with AMX / AVX-512 BF16 and on bf16 GPUs, else fp32)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    # Every check up to the model's loading depends only on the arguments and the files, so under torchrun each
    # rank makes the same ones and a usage mistake ends every rank alike, before any of them waits for the others.
    for flag, problem in (("--out", output_problem(args.out, folder=True)),
                          ("--checkpoint", checkpoint_problem(args.checkpoint))):
        if problem:
            p.error(f"{flag} {problem}")
    images, missing = collect_inputs(args.inputs)
    if not images:
        p.error("no image file (" + ", ".join(IMAGE_SUFFIXES) + ") in " + ", ".join(map(str, args.inputs))
                + (f" ({', '.join(map(str, missing))}: no such file or folder)" if missing else ""))
    clash = first_name_clash(images)
    if clash:
        p.error(f"--out: {clash[0]} and {clash[1]} would both write {clash[0].stem}.png into {args.out}; "
                "predict them in separate runs or rename one")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = args.device
    if distributed:
        try:  # this process's GPU (cuda:LOCAL_RANK) by default, as seg.train and seg.eval
            device = pick_device(args.device or "auto", int(os.environ.get("LOCAL_RANK", "0")))
        except ConfigError as error:
            print(f"error: {flag_message(error)}", file=sys.stderr)
            return 2
    from seg.predictor import Segmenter

    try:
        segmenter = Segmenter.from_checkpoint(args.checkpoint, device=device, crop_size=args.crop_size,
                                              max_pixels=args.max_pixels or None, precision=args.precision)
        args.out.mkdir(parents=True, exist_ok=True)
    except (CheckpointError, HubError, ModelCardError) as error:
        print(f"error: --checkpoint: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: --out {args.out}: cannot create it ({error.strerror})", file=sys.stderr)
        return 2

    missed = [f"{path}: no such file or folder" for path in missing]
    if not distributed:
        failed = missed + predict_images(segmenter, images, args)
        report(len(images) - (len(failed) - len(missed)), failed, args.out)
        return 1 if failed else 0
    return predict_sharded(segmenter, images, missed, args)


def predict_images(segmenter, images, args, progress: bool = True, desc: str = "predict") -> List[str]:
    """Write the outputs of each image in ``images``; the failure line of each one that could not be read."""
    failed = []
    for path in tqdm(images, desc=desc, unit="img", disable=not progress):
        try:
            rgb = segmenter.read(path)  # decoded once for the mask and the overlay
            if args.proba:
                probabilities = segmenter.predict_proba(rgb, ms_flip=args.ms_flip, scales=args.scales)
                np.save(args.out / f"{path.stem}_proba.npy", probabilities)
                mask = probabilities.argmax(0).astype(np.uint8)
            else:
                mask = segmenter.predict(rgb, ms_flip=args.ms_flip, scales=args.scales)
            segmenter.save_mask(mask, args.out / f"{path.stem}.png")
            if args.overlay:
                segmenter.overlay(rgb, mask).save(args.out / f"{path.stem}_overlay.png")
        except DataError as error:
            failed.append(str(error))
            tqdm.write(f"skipped {error}", file=sys.stderr)
    return failed


def report(done: int, failed: List[str], out: Path) -> None:
    """The summary: masks written, then each failed input on stderr."""
    print(f"wrote {done} mask(s) to {out}" + (f"; {len(failed)} input(s) failed:" if failed else ""), flush=True)
    for line in failed:
        print(f"  {line}", file=sys.stderr, flush=True)


def predict_sharded(segmenter, images: List[Path], missed: List[str], args) -> int:
    """Under torchrun: rank r predicts images r, r + W, ... of the list; rank 0 reports every rank's outcome in
    one summary; the exit status (1 if any rank failed an input) is the same on every rank."""
    context = init_distributed(str(segmenter.device))
    try:
        group = object_group()
        # Every rank listed the folders itself (to check the arguments alike); the shares are dealt from rank 0's
        # list, so that a file added or removed meanwhile cannot be predicted twice or skipped.
        listing = [(images, missed)]
        dist.broadcast_object_list(listing, src=0, group=group)
        images, missed = listing[0]
        mine = shard(images, context.rank, context.world_size)
        failures = predict_images(segmenter, mine, args, progress=context.is_main,
                                  desc=f"predict (rank 0's {len(mine)} of {len(images)})")
        outcomes: List[Optional[Tuple[int, List[str]]]] = [None] * context.world_size
        dist.all_gather_object(outcomes, (len(mine) - len(failures), failures), group=group)
        failed = missed + [line for _, lines in outcomes for line in lines]
        if context.is_main:
            report(sum(done for done, _ in outcomes), failed, args.out)
        # No rank exits before rank 0 has printed: torchrun ends the other ranks once one exits with a failure.
        dist.barrier(group=group)
    finally:
        shutdown_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
