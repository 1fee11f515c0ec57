"""Prepare Cityscapes (fine annotations) for ``seg``: extract the official zips, verify, write labelTrainIds.

Download ``gtFine_trainvaltest.zip`` (241 MB) and ``leftImg8bit_trainvaltest.zip`` (11 GB) from
https://www.cityscapes-dataset.com/downloads/ (a free login is needed, so this script cannot fetch them), then:

    python datasets/prepare_cityscapes.py --gtfine gtFine_trainvaltest.zip --leftimg leftImg8bit_trainvaltest.zip
    python datasets/prepare_cityscapes.py --skip-extract --root /data/cityscapes   # already extracted

It extracts both zips safely into the root (default ``$SEG_DATA_ROOT/cityscapes``, else ``datasets/cityscapes``),
checks the layout (2,975 train / 500 val / 1,525 test frames; every train and val frame with its polygons and
labelIds), and writes ``*_gtFine_labelTrainIds.png`` beside every ``*_gtFine_polygons.json`` with the official
converter (``cityscapesscripts``' ``json2labelImg(..., "trainIds")``, as its ``createTrainIdLabelImgs`` does), in
parallel. Files already converted are skipped unless ``--force``; each is written under a temporary name and
renamed, so an interrupted run leaves no truncated label file. The converter is needed by this script only:
``pip install cityscapesscripts``.

Exit status: 0 done (or nothing to do), 2 for mistakes, missing files and failed conversions (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, List, Optional, Tuple

try:
    import seg  # noqa: F401  (installed, or the repository root on PYTHONPATH)
except ImportError:  # run straight from a checkout: python datasets/prepare_cityscapes.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from seg.cli import ArgumentParser
from seg.data.download import (
    PreparationError,
    archive_members,
    default_root,
    parse_counts,
    run_cli,
    safe_extract,
)

# Frames per split in leftImg8bit/<split>/<city>/. Tests override these with --expect-counts.
EXPECTED_COUNTS: Dict[str, int] = {"train": 2975, "val": 500, "test": 1525}
IMAGE_SUFFIX = "_leftImg8bit.png"
POLYGONS_SUFFIX = "_gtFine_polygons.json"
OUTPUT_SUFFIX = "_gtFine_labelTrainIds.png"
INSTALL_HINT = "pip install cityscapesscripts"


def _frames(folder: Path, suffix: str) -> Optional[set]:
    """``city/<frame>`` for every ``<city>/<frame><suffix>`` under ``folder`` (None if it is missing)."""
    if not folder.is_dir():
        return None
    frames = set()
    with os.scandir(folder) as cities:
        for city in cities:
            if city.is_dir():
                with os.scandir(city.path) as files:
                    frames.update(f"{city.name}/{f.name[: -len(suffix)]}" for f in files if f.name.endswith(suffix))
    return frames


def layout_problems(root: Path, expected: Dict[str, int]) -> List[str]:
    """What is missing under ``root`` (an empty list when the layout is complete)."""
    problems = []
    for split, count in expected.items():
        image_dir = root / "leftImg8bit" / split
        images = _frames(image_dir, IMAGE_SUFFIX)
        if images is None:
            problems.append(f"{image_dir} is missing")
            continue
        if len(images) != count:
            problems.append(f"{image_dir} holds {len(images):,} *{IMAGE_SUFFIX} frames, expected {count:,}")
        if split == "test":  # no public labels; whatever gtFine/test holds is converted but not required
            continue
        label_dir = root / "gtFine" / split
        for suffix in (POLYGONS_SUFFIX, "_gtFine_labelIds.png"):
            missing = sorted(images - (_frames(label_dir, suffix) or set()))
            if missing:
                problems.append(f"{label_dir}: {len(missing):,} frame(s) without *{suffix}, e.g. {missing[0]}")
    return problems


def _check_zip(flag: str, archive: Path, top: str, official: str) -> None:
    """Refuse a zip that is not the one the flag names (e.g. the two swapped) before extracting anything."""
    if not archive.is_file():
        raise PreparationError(f"{flag} {archive}: no such file; expected the official {official}")
    if not any(member.path.parts[:1] == (top,) for member in archive_members(archive)):
        raise PreparationError(f"{flag} {archive}: no {top}/ members; expected the official {official}")


def _load_converter():
    """The official json2labelImg, or a PreparationError saying how to install it."""
    try:
        from cityscapesscripts.preparation.json2labelImg import json2labelImg
    except ImportError:
        raise PreparationError(
            f"the official Cityscapes converter is not installed: {INSTALL_HINT} "
            f"(needed to write *{OUTPUT_SUFFIX})"
        ) from None
    return json2labelImg


def convert_one(task: Tuple[str, str]) -> Tuple[str, Optional[str]]:
    """Write one labelTrainIds PNG from its polygons; returns (json path, error message or None).

    Runs in a worker process. The converter prints to stdout and calls ``sys.exit`` on an unknown label; that is
    caught here and reported, because a worker that exits would leave its task unanswered and the pool waiting.
    """
    json_path, output_path = task
    output = Path(output_path)
    # Not *_labelTrainIds.png, so a leftover from a killed run is never taken for a label file.
    temporary = output.with_name(f".{output.name[: -len('.png')]}.{os.getpid()}.tmp.png")
    captured = io.StringIO()
    try:
        json2labelImg = _load_converter()
        with contextlib.redirect_stdout(captured):
            json2labelImg(json_path, str(temporary), "trainIds")
        os.replace(temporary, output)
        return json_path, None
    except (Exception, SystemExit) as error:
        temporary.unlink(missing_ok=True)
        printed = captured.getvalue().strip().splitlines()
        return json_path, (printed[0] if printed else f"{type(error).__name__}: {error}")


def convert_all(root: Path, workers: int, force: bool, progress: bool) -> Tuple[int, int]:
    """Convert every gtFine/<split>/<city>/*_polygons.json; returns (written, already there)."""
    polygons = sorted((root / "gtFine").glob(f"*/*/*{POLYGONS_SUFFIX}"))
    tasks = []
    for path in polygons:
        output = path.with_name(path.name[: -len(POLYGONS_SUFFIX)] + OUTPUT_SUFFIX)
        if force or not output.is_file():
            tasks.append((str(path), str(output)))
    skipped = len(polygons) - len(tasks)
    if not tasks:
        return 0, skipped
    failures = []
    bar = tqdm(total=len(tasks), unit="file", desc="labelTrainIds", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers == 1:
            results = map(convert_one, tasks)
            for json_path, error in results:
                if error:
                    failures.append((json_path, error))
                bar.update()
        else:
            chunk = max(1, min(16, len(tasks) // (workers * 8)))
            with Pool(min(workers, len(tasks))) as pool:
                for json_path, error in pool.imap_unordered(convert_one, tasks, chunksize=chunk):
                    if error:
                        failures.append((json_path, error))
                    bar.update()
    if failures:
        json_path, error = sorted(failures)[0]
        raise PreparationError(f"{len(failures):,} of {len(tasks):,} conversions failed, e.g. {json_path}: {error}")
    return len(tasks), skipped


def main(argv: Optional[List[str]] = None) -> int:
    parser = ArgumentParser(
        prog="prepare_cityscapes.py",
        description="Extract the official Cityscapes zips safely, verify them, write *_gtFine_labelTrainIds.png.",
    )
    parser.add_argument("--root", type=Path, default=None,
                        help="dataset folder (default: $SEG_DATA_ROOT/cityscapes, else datasets/cityscapes)")
    parser.add_argument("--gtfine", type=Path, default=None, help="gtFine_trainvaltest.zip")
    parser.add_argument("--leftimg", type=Path, default=None, help="leftImg8bit_trainvaltest.zip")
    parser.add_argument("--skip-extract", action="store_true", help="use the already extracted root as it is")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="conversion processes (default: min(8, CPUs))")
    parser.add_argument("--force", action="store_true",
                        help="extract again and rewrite labelTrainIds that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # For tests with a few real frames: SPLIT=COUNT,... replaces EXPECTED_COUNTS (unlisted splits are not checked).
    parser.add_argument("--expect-counts", type=parse_counts, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: expected at least 1")
    if args.skip_extract and (args.gtfine or args.leftimg):
        parser.error("--skip-extract cannot be combined with --gtfine/--leftimg")
    if not args.skip_extract and not (args.gtfine or args.leftimg):
        parser.error("pass --gtfine and --leftimg (the official zips), or --skip-extract to use an extracted root")
    return run_cli(lambda: prepare(args))


def prepare(args) -> int:
    root = default_root("cityscapes", args.root)
    expected = args.expect_counts if args.expect_counts is not None else EXPECTED_COUNTS
    unknown = sorted(set(expected) - set(EXPECTED_COUNTS))
    if unknown:
        raise PreparationError(f"--expect-counts: unknown split {unknown[0]!r}; expected train, val or test")
    progress = not args.no_progress
    zips = [(flag, path, top, official) for flag, path, top, official in (
        ("--gtfine", args.gtfine, "gtFine", "gtFine_trainvaltest.zip"),
        ("--leftimg", args.leftimg, "leftImg8bit", "leftImg8bit_trainvaltest.zip"),
    ) if path is not None]
    _load_converter()  # fail before a long extraction, not after it
    for flag, path, top, official in zips:
        _check_zip(flag, path, top, official)
    if args.skip_extract and not root.is_dir():
        raise PreparationError(f"--root {root}: no such folder; expected an extracted Cityscapes root "
                               f"(leftImg8bit/ and gtFine/)")

    complete = not layout_problems(root, expected)
    if zips and complete and not args.force:
        print(f"{root}: already extracted and complete; not extracting again (--force to do it anyway)")
    elif zips:
        for _, path, _, _ in zips:
            safe_extract(path, root, progress=progress)
        complete = False
    problems = [] if complete else layout_problems(root, expected)
    if problems:
        raise PreparationError(f"Cityscapes in {root} is incomplete: " + "; ".join(problems))

    written, skipped = convert_all(root, args.workers, args.force, progress)
    summary = ", ".join(f"{count:,} {split}" for split, count in expected.items())
    if written == 0:
        print(f"Cityscapes in {root} is already prepared ({summary} frames; {skipped:,} *{OUTPUT_SUFFIX} "
              f"already there); nothing to do")
    else:
        print(f"Cityscapes is ready in {root} ({summary} frames): wrote {written:,} *{OUTPUT_SUFFIX}"
              + (f", {skipped:,} were already there" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
