"""datasets/prepare_ade20k.py on small zips in the official ADEChallengeData2016 layout."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.data import IGNORE_INDEX, build_dataset

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "datasets" / "prepare_ade20k.py"
SPLITS = {"training": 3, "validation": 2}
COUNTS = ["--expect-counts", "train=3,val=2"]


def load_script():
    """The script as a module, so that tests can call main() in-process and patch its constants."""
    spec = importlib.util.spec_from_file_location("prepare_ade20k_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def official_members(split_counts=SPLITS):
    """{name: bytes} of a tiny archive in the official layout; annotation pixel (0, x) holds value x % 151."""
    rng = np.random.default_rng(0)
    members = {"ADEChallengeData2016/objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n"}
    for folder, count in split_counts.items():
        kind = "train" if folder == "training" else "val"
        for index in range(1, count + 1):
            stem = f"ADE_{kind}_{index:08d}"
            pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            labels = np.tile((np.arange(32) + index) % 151, (24, 1)).astype(np.uint8)
            members[f"ADEChallengeData2016/images/{folder}/{stem}.jpg"] = encoded(Image.fromarray(pixels), "JPEG")
            members[f"ADEChallengeData2016/annotations/{folder}/{stem}.png"] = encoded(Image.fromarray(labels), "PNG")
    return members


def write_zip(path: Path, members: dict, extra: zipfile.ZipInfo = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder in ("images", "annotations"):
            archive.writestr(f"ADEChallengeData2016/{folder}/", b"")
        for name, data in members.items():
            archive.writestr(name, data)
        if extra is not None:
            archive.writestr(extra, b"/etc/passwd")
    return path


@pytest.fixture
def ade_zip(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "ADEChallengeData2016.zip", official_members())


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_from_archive_then_again_does_nothing(ade_zip, tmp_path):
    root = tmp_path / "data" / "ade20k"
    result = run_script("--archive", str(ade_zip), "--root", str(root), "--skip-checksum", "--no-progress", *COUNTS)
    assert result.returncode == 0, result.stderr
    assert "ADE20K is ready" in result.stdout and "checksum not checked" in result.stdout

    # Every member landed, byte for byte, and nothing else (no temporary files).
    members = official_members()
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert files == members
    assert ade_zip.is_file()  # an --archive the user passed is never deleted

    # The adapter reads the result: 0 -> ignore, v -> v - 1.
    train = build_dataset("ade20k", "train", root=root)
    assert len(train) == 3 and len(build_dataset("ade20k", "val", root=root)) == 2
    sample = train[0]
    stored = (np.arange(32) + 1) % 151
    expected_row = np.where(stored == 0, IGNORE_INDEX, stored - 1)
    assert sample["image"].shape == (24, 32, 3)
    np.testing.assert_array_equal(sample["mask"], np.tile(expected_row, (24, 1)))

    before = snapshot(root)
    again = run_script("--archive", str(ade_zip), "--root", str(root), "--no-progress", *COUNTS)
    assert again.returncode == 0, again.stderr
    assert "already prepared" in again.stdout and "nothing to do" in again.stdout
    assert snapshot(root) == before  # nothing rewritten (and no checksum was needed to find that out)


def test_download_checks_the_sha1_and_removes_the_downloaded_archive(ade_zip, tmp_path, monkeypatch, capsys):
    script = load_script()
    monkeypatch.setattr(script, "ARCHIVE_SHA1", hashlib.sha1(ade_zip.read_bytes()).hexdigest())
    monkeypatch.setattr(script, "EXPECTED_COUNTS", {"train": 3, "val": 2})
    root = tmp_path / "ade20k"
    assert script.main(["--url", ade_zip.as_uri(), "--root", str(root), "--no-progress"]) == 0
    assert "ADE20K is ready" in capsys.readouterr().out
    assert len(build_dataset("ade20k", "val", root=root)) == 2
    assert not (root / "ADEChallengeData2016.zip").exists()  # our own download is removed once verified
    assert not (root / "ADEChallengeData2016.zip.partial").exists()

    kept = tmp_path / "kept"
    assert script.main(["--url", ade_zip.as_uri(), "--root", str(kept), "--no-progress", "--keep-archive"]) == 0
    assert (kept / "ADEChallengeData2016.zip").read_bytes() == ade_zip.read_bytes()


def test_wrong_checksum_is_refused_before_extraction(ade_zip, tmp_path, monkeypatch, capsys):
    script = load_script()
    wrong = "1" * 40
    monkeypatch.setattr(script, "ARCHIVE_SHA1", wrong)
    root = tmp_path / "ade20k"
    assert script.main(["--archive", str(ade_zip), "--root", str(root), "--no-progress", *COUNTS]) == 2
    error = capsys.readouterr().err.strip()
    actual = hashlib.sha1(ade_zip.read_bytes()).hexdigest()
    assert error.count("\n") == 0 and str(ade_zip) in error and wrong in error and actual in error
    assert "--skip-checksum" in error
    assert not (root / "ADEChallengeData2016").exists()

    # The same through a download: nothing is left behind, neither the archive nor its partial file.
    assert script.main(["--url", ade_zip.as_uri(), "--root", str(root), "--no-progress", *COUNTS]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not root.exists() or not any(root.iterdir())


def test_root_may_be_the_package_folder_itself(ade_zip, tmp_path, capsys):
    script = load_script()
    root = tmp_path / "ade20k"
    base = ["--archive", str(ade_zip), "--skip-checksum", "--no-progress", *COUNTS]
    assert script.main(base + ["--root", str(root)]) == 0
    package = root / "ADEChallengeData2016"
    capsys.readouterr()
    assert script.main(base + ["--root", str(package)]) == 0  # the adapter accepts this root too
    assert f"already prepared in {package}" in capsys.readouterr().out

    (package / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    assert script.main(base + ["--root", str(package)]) == 2  # not extracted into a nested copy
    error = capsys.readouterr().err
    assert f"--root {package}: is an ADEChallengeData2016 folder itself" in error and "holds 1 .png" in error
    assert not (package / "ADEChallengeData2016").exists()


def test_counts_that_do_not_match_are_a_one_line_error(ade_zip, tmp_path):
    root = tmp_path / "ade20k"
    result = run_script("--archive", str(ade_zip), "--root", str(root), "--skip-checksum", "--no-progress",
                        "--expect-counts", "train=4,val=2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: ")
    assert f"{root / 'ADEChallengeData2016' / 'images' / 'training'} holds 3 .jpg files, expected 4" in lines[0]


def test_unpaired_files_are_reported(tmp_path, capsys):
    members = official_members()
    del members["ADEChallengeData2016/annotations/training/ADE_train_00000002.png"]
    archive = write_zip(tmp_path / "unpaired.zip", members)
    script = load_script()
    root = tmp_path / "ade20k"
    argv = ["--archive", str(archive), "--root", str(root), "--skip-checksum", "--no-progress",
            "--expect-counts", "train=3"]
    assert script.main(argv) == 2
    error = capsys.readouterr().err
    assert "holds 2 .png files, expected 3" in error and "without their pair, e.g. ADE_train_00000002" in error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--archive", "{tmp}/missing.zip"], "--archive {tmp}/missing.zip: no such file"),
        (["--archive", "{tmp}/other.zip"], "no ADEChallengeData2016/images/ members"),
        (["--expect-counts", "test=1", "--archive", "{tmp}/other.zip"], "--expect-counts: unknown split 'test'"),
    ],
    ids=["missing", "not-ade", "bad-split"],
)
def test_user_mistakes_are_one_line_with_status_2(tmp_path, capsys, argv, message):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as other:
        other.writestr("something/else.txt", b"hello")
    script = load_script()
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--root", str(tmp_path / "ade20k"), "--skip-checksum"]
    assert script.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message.format(tmp=tmp_path) in error
    assert not (tmp_path / "ade20k" / "ADEChallengeData2016").exists()


def test_archive_and_url_are_exclusive(ade_zip, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        load_script().main(["--archive", str(ade_zip), "--url", ade_zip.as_uri()])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not allowed with argument" in error


def hostile_entry(kind: str, tmp_path: Path) -> zipfile.ZipInfo:
    names = {
        "dotdot": "../evil.txt",
        "nested-dotdot": "ADEChallengeData2016/images/../../../evil.txt",
        "absolute": str(tmp_path / "absolute-evil.txt"),
        "symlink": "ADEChallengeData2016/images/training/link.jpg",
    }
    info = zipfile.ZipInfo(names[kind])
    info.create_system = 3
    info.external_attr = ((stat.S_IFLNK if kind == "symlink" else stat.S_IFREG) | 0o777) << 16
    return info


@pytest.mark.parametrize("kind", ["dotdot", "nested-dotdot", "absolute", "symlink"])
def test_hostile_archive_is_refused_and_nothing_is_written(tmp_path, capsys, kind):
    entry = hostile_entry(kind, tmp_path)
    archive = write_zip(tmp_path / "hostile.zip", official_members(), extra=entry)
    root = tmp_path / "work" / "ade20k"
    argv = ["--archive", str(archive), "--root", str(root), "--skip-checksum", "--no-progress", *COUNTS]
    assert load_script().main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert str(archive) in lines[0] and f"refusing to extract member {entry.filename!r}" in lines[0]
    # Nothing at all was written: not the good members, nothing beside or above the root.
    assert not root.exists() or not any(root.iterdir())
    for outside in (tmp_path / "evil.txt", tmp_path / "work" / "evil.txt", tmp_path / "absolute-evil.txt",
                    REPO / "evil.txt", REPO.parent / "evil.txt"):
        assert not outside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.zip"] + (["work"] if root.parent.exists() else [])
