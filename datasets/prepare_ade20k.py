"""Prepare ADE20K (SceneParsing, ADEChallengeData2016) for ``seg``: download, verify, extract, check.

    python datasets/prepare_ade20k.py                      # download (923 MB, resumable) into datasets/ade20k
    python datasets/prepare_ade20k.py --archive ~/Downloads/ADEChallengeData2016.zip
    python datasets/prepare_ade20k.py --root /data/ade20k  # or set SEG_DATA_ROOT=/data

The result is ``<root>/ADEChallengeData2016/{images,annotations}/{training,validation}/``, which is what
``build_dataset("ade20k", root=<root>)`` reads. The archive's SHA-1 is checked (the digest GluonCV's ADE20K
script verifies), and after extraction the file counts (20,210 training and 2,000 validation images, each with
its annotation) are checked. Running it again once the data is in place only re-counts the files. A downloaded
archive is deleted after a successful extraction unless ``--keep-archive``; an ``--archive`` you pass is never
deleted.

Exit status: 0 done (or nothing to do), 2 for mistakes and wrong files (one line on stderr), 1 when the download
itself fails (rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

try:
    import seg  # noqa: F401  (installed, or the repository root on PYTHONPATH)
except ImportError:  # run straight from a checkout: python datasets/prepare_ade20k.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.cli import ArgumentParser
from seg.data.ade20k import FOLDERS
from seg.data.download import (
    PreparationError,
    archive_members,
    default_root,
    download,
    parse_counts,
    run_cli,
    safe_extract,
    verify_checksum,
)

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ARCHIVE_NAME = "ADEChallengeData2016.zip"
PACKAGE = "ADEChallengeData2016"
# SHA-1 of the official zip as verified by GluonCV's scripts/datasets/ade20k.py (dmlc/gluon-cv); taken from
# there, not recomputed here (no network where this was written). --skip-checksum bypasses it.
ARCHIVE_SHA1 = "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"
# Images per split (each with a same-named annotation PNG). Tests override these with --expect-counts.
EXPECTED_COUNTS: Dict[str, int] = {"train": 20210, "val": 2000}


def _stems(folder: Path, suffix: str) -> Optional[set]:
    """Stems of the files with ``suffix`` directly in ``folder`` (None if the folder is missing)."""
    if not folder.is_dir():
        return None
    with os.scandir(folder) as entries:
        return {e.name[: -len(suffix)] for e in entries if e.is_file() and e.name.lower().endswith(suffix)}


def package_folder(root: Path) -> Path:
    """``root/ADEChallengeData2016``, or ``root`` itself when it is that folder (the adapter accepts both)."""
    return root if (root / "images").is_dir() and (root / "annotations").is_dir() else root / PACKAGE


def layout_problems(package: Path, expected: Dict[str, int]) -> List[str]:
    """What is wrong with the ADEChallengeData2016 folder ``package`` (an empty list when it is complete)."""
    problems = []
    for split, count in expected.items():
        folder = FOLDERS[split]
        images = _stems(package / "images" / folder, ".jpg")
        annotations = _stems(package / "annotations" / folder, ".png")
        for kind, found, suffix in (("images", images, ".jpg"), ("annotations", annotations, ".png")):
            where = package / kind / folder
            if found is None:
                problems.append(f"{where} is missing")
            elif len(found) != count:
                problems.append(f"{where} holds {len(found):,} {suffix} files, expected {count:,}")
        if images is not None and annotations is not None:
            unpaired = sorted(images ^ annotations)
            if unpaired:
                problems.append(f"{package}: {len(unpaired):,} {folder} image(s) or annotation(s) without their "
                                f"pair, e.g. {unpaired[0]}")
    return problems


def _check_archive_structure(archive: Path) -> None:
    """Refuse an archive that is not the SceneParsing one before extracting anything from it."""
    names = {str(member.path) for member in archive_members(archive)}
    for kind in ("images", "annotations"):
        prefix = f"{PACKAGE}/{kind}/"
        if not any(name.startswith(prefix) for name in names):
            raise PreparationError(f"{archive}: no {prefix} members; expected the official {ARCHIVE_NAME}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = ArgumentParser(
        prog="prepare_ade20k.py",
        description="Download (or take) ADEChallengeData2016.zip, extract it safely and verify it.",
    )
    parser.add_argument("--root", type=Path, default=None,
                        help="dataset folder (default: $SEG_DATA_ROOT/ade20k, else datasets/ade20k)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", type=Path, default=None,
                        help=f"an already downloaded {ARCHIVE_NAME} (not deleted afterwards)")
    source.add_argument("--url", default=URL, help="where to download the archive from (default: official)")
    parser.add_argument("--skip-checksum", action="store_true",
                        help="do not check the archive's SHA-1 (e.g. a repacked mirror); the counts still are")
    parser.add_argument("--keep-archive", action="store_true", help="keep the downloaded zip after extraction")
    parser.add_argument("--force", action="store_true", help="extract again even if the data looks complete")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # For tests with a small archive in the official layout: SPLIT=COUNT,... replaces EXPECTED_COUNTS.
    parser.add_argument("--expect-counts", type=parse_counts, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_cli(lambda: prepare(args))


def prepare(args) -> int:
    root = default_root("ade20k", args.root)
    expected = args.expect_counts if args.expect_counts is not None else EXPECTED_COUNTS
    unknown = sorted(set(expected) - set(FOLDERS))
    if unknown:
        raise PreparationError(f"--expect-counts: unknown split {unknown[0]!r}; expected {' or '.join(FOLDERS)}")
    progress = not args.no_progress
    if args.archive is not None and not args.archive.is_file():
        raise PreparationError(f"--archive {args.archive}: no such file; expected the official {ARCHIVE_NAME}")
    if root.exists() and not root.is_dir():
        raise PreparationError(f"--root {root}: is a file; expected a folder")

    summary = ", ".join(f"{count:,} {split}" for split, count in expected.items())
    package = package_folder(root)
    problems = layout_problems(package, expected)
    if not args.force and not problems:
        print(f"ADE20K is already prepared in {package} ({summary} images with annotations); nothing to do")
        return 0
    if package == root:  # extracting would nest a second ADEChallengeData2016/ inside this one
        detail = f" ({problems[0]})" if problems else ""
        raise PreparationError(f"--root {root}: is an ADEChallengeData2016 folder itself{detail}; to extract, pass "
                               f"the folder that should contain ADEChallengeData2016/")

    sha1 = None if args.skip_checksum else ARCHIVE_SHA1
    downloaded = args.archive is None
    if downloaded:
        archive = download(args.url, root / ARCHIVE_NAME, sha1=sha1, progress=progress)
    else:
        archive = args.archive
        if sha1:
            try:
                verify_checksum(archive, sha1=sha1)
            except PreparationError as error:
                raise PreparationError(f"{error} (pass --skip-checksum to rely on the file counts only)") from None
    _check_archive_structure(archive)
    safe_extract(archive, root, progress=progress)

    problems = layout_problems(root / PACKAGE, expected)
    if problems:
        raise PreparationError(f"{archive} was extracted into {root}, but " + "; ".join(problems))
    if downloaded and not args.keep_archive:
        archive.unlink()
    print(f"ADE20K is ready in {root / PACKAGE}: {summary} images with annotations"
          + ("" if sha1 else " (checksum not checked)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
