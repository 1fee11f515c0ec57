"""``python -m seg.data check --dataset NAME [--data-root DIR] [--split SPLIT]``: scan a dataset for problems.

Exit status: 0 when every sample loads cleanly (warnings, such as classes that never occur, are printed but
pass), 1 when problems were found (each printed on its own line), 2 for usage errors (unknown dataset, missing
root or split, no sample at all), reported as one line on stderr.
"""

from __future__ import annotations

import sys

from seg.cli import ArgumentParser

from . import DataError, build_dataset, list_datasets
from .base import SplitNotFoundError
from .check import check_dataset
from .cityscapes import LABEL_MODES


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m seg.data", description="Dataset tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="scan a dataset and report every problem at once")
    check.add_argument("--dataset", required=True, help=f"one of: {', '.join(list_datasets())}")
    check.add_argument("--data-root", default=None, help="the dataset's folder (default: $SEG_DATA_ROOT/<name>)")
    check.add_argument("--split", default=None, help="train, val or test (default: all that exist)")
    check.add_argument("--label-mode", default="auto", choices=LABEL_MODES, help="Cityscapes label source")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.dataset not in list_datasets():
        parser.error(f"--dataset {args.dataset!r} is unknown; choose one of: {', '.join(list_datasets())}")
    options = {"label_mode": args.label_mode} if args.dataset == "cityscapes" else {}
    splits = [args.split] if args.split else ["train", "val", "test"]
    found, warnings, checked, empty = [], [], 0, []
    for split in splits:
        try:
            dataset = build_dataset(args.dataset, split, root=args.data_root, allow_unpaired=True, **options)
        except DataError as error:
            if isinstance(error, SplitNotFoundError) and args.split is None:
                continue  # checking all splits: a dataset without this one is fine
            print(f"error: {error}", file=sys.stderr)
            return 2
        report = check_dataset(dataset, progress=not args.quiet)
        checked += report.samples
        if report.samples == 0 and not report.problems:
            empty.append(split)
        print(f"{args.dataset} {split}: {report.samples} samples, {len(report.problems)} problem(s), "
              f"{len(report.warnings)} warning(s)")
        found += report.problems
        warnings += report.warnings
    if checked == 0 and not found:
        where = f" under {args.data_root}" if args.data_root else ""
        reason = (f"split(s) {', '.join(empty)} hold no image/mask pair" if empty else "no split was found")
        print(f"error: {args.dataset}{where}: {reason}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"warning: {line}")
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
