"""datasets/prepare_cityscapes.py on the real sample frames (copied into tmp_path only, never into the repo)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.data import build_dataset

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "datasets" / "prepare_cityscapes.py"
TRAIN_FRAMES = 8  # the real samples: 4 aachen + 4 bochum frames at 2048x1024
FRAME_KINDS = ("_gtFine_polygons.json", "_gtFine_labelIds.png")


def require_converter():
    return pytest.importorskip(
        "cityscapesscripts.preparation.json2labelImg",
        reason="cityscapesscripts (the official converter, a test dependency) is not installed",
    ).json2labelImg


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_cityscapes_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=180,
    )


def sample_files(source: Path, per_city=None):
    """Relative paths of the real train frames' images, polygons and labelIds (not the shipped labelTrainIds),
    all frames or the first ``per_city`` of each city."""
    images = sorted((source / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    if per_city is not None:
        images = [i for i in images if sorted(i.parent.glob("*_leftImg8bit.png")).index(i) < per_city]
    names = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        names.append(image.relative_to(source))
        names += [Path("gtFine", "train", image.parent.name, stem + kind) for kind in FRAME_KINDS]
    return names


@pytest.fixture
def source(shared) -> Path:
    return shared("data", "cityscapes")


@pytest.fixture
def root(source, tmp_path) -> Path:
    """A temporary Cityscapes root holding copies of the real train frames (without labelTrainIds)."""
    target = tmp_path / "cityscapes"
    for name in sample_files(source):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)  # copyfile: not the read-only mode bits
    return target


def labels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def outputs(root: Path):
    return sorted(root.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))


def test_labeltrainids_equal_the_official_converter_and_the_shipped_files(root, source, tmp_path, capsys):
    json2labelImg = require_converter()
    result = run_script("--root", str(root), "--skip-extract", "--workers", "2", "--expect-counts",
                        f"train={TRAIN_FRAMES}")
    assert result.returncode == 0, result.stderr
    assert f"wrote {TRAIN_FRAMES} *_gtFine_labelTrainIds.png" in result.stdout
    written = outputs(root)
    assert len(written) == TRAIN_FRAMES
    assert not [p for p in root.rglob(".*")]  # no temporary files left behind

    agree = total = 0
    worst = 1.0
    for output in written:
        polygons = output.with_name(output.name.replace("_labelTrainIds.png", "_polygons.json"))
        # (a) pixel-identical to the installed converter run directly on the same polygons
        reference = tmp_path / "reference.png"
        json2labelImg(str(polygons), str(reference), "trainIds")
        ours = labels(output)
        np.testing.assert_array_equal(ours, labels(reference), err_msg=str(output))
        # (b) agrees with the labelTrainIds shipped with the samples (made by cityscapesScripts, maybe another
        # Pillow: polygon edges may rasterise a few pixels differently)
        shipped = labels(source / output.relative_to(root))
        assert ours.shape == shipped.shape == (1024, 2048)
        same = int((ours == shipped).sum())
        agree, total, worst = agree + same, total + ours.size, min(worst, same / ours.size)
    assert set(np.unique(np.concatenate([labels(p).ravel() for p in written]))) <= set(range(19)) | {255}
    with capsys.disabled():
        print(f"\n[cityscapes] labelTrainIds agreement with the shipped files: {100 * agree / total:.5f} % overall, "
              f"{100 * worst:.5f} % worst frame ({total - agree} of {total} pixels differ)")
    assert agree / total >= 0.9999 and worst >= 0.9999

    # The adapter picks the converted labels up in its default mode.
    dataset = build_dataset("cityscapes", "train", root=root)
    assert dataset.label_mode == "labelTrainIds" and len(dataset) == TRAIN_FRAMES


def test_rerun_skips_converted_files_unless_forced(root, capsys):
    require_converter()
    script = load_script()  # in-process with one worker: the subprocess and the pool are covered above
    argv = ["--root", str(root), "--skip-extract", "--workers", "1", "--expect-counts", f"train={TRAIN_FRAMES}",
            "--no-progress"]
    assert script.main(argv) == 0
    capsys.readouterr()
    first, second = outputs(root)[:2]
    good = first.read_bytes()
    first.write_bytes(b"not a png")  # a skipped file stays exactly as it is ...
    second.unlink()  # ... and only the missing one is written

    assert script.main(argv) == 0
    assert "wrote 1 *_gtFine_labelTrainIds.png, 7 were already there" in capsys.readouterr().out
    assert first.read_bytes() == b"not a png" and second.is_file()

    before = {p: p.stat().st_mtime_ns for p in outputs(root)}
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "already prepared" in out and "nothing to do" in out
    assert {p: p.stat().st_mtime_ns for p in outputs(root)} == before

    assert script.main(argv + ["--force"]) == 0
    assert f"wrote {TRAIN_FRAMES} " in capsys.readouterr().out and first.read_bytes() == good


def write_zip(path: Path, source: Path, names) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # PNGs do not compress further
        for name in names:
            archive.write(source / name, name.as_posix())
    return path


def test_extracts_the_official_zips_then_converts(source, tmp_path):
    json2labelImg = require_converter()
    names = sample_files(source, per_city=1)  # one frame of each city: two city folders, two frames
    frames = len([n for n in names if n.name.endswith("_leftImg8bit.png")])
    gtfine = write_zip(tmp_path / "gtFine_trainvaltest.zip", source, [n for n in names if n.parts[0] == "gtFine"])
    leftimg = write_zip(tmp_path / "leftImg8bit_trainvaltest.zip", source,
                        [n for n in names if n.parts[0] == "leftImg8bit"])
    root = tmp_path / "cityscapes"
    args = ("--root", str(root), "--gtfine", str(gtfine), "--leftimg", str(leftimg), "--workers", "2",
            "--expect-counts", f"train={frames}")
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    for name in names:
        assert (root / name).read_bytes() == (source / name).read_bytes()
    written = outputs(root)
    assert len(written) == frames >= 2
    for output in written:
        reference = tmp_path / "reference.png"
        json2labelImg(str(output).replace("_labelTrainIds.png", "_polygons.json"), str(reference), "trainIds")
        np.testing.assert_array_equal(labels(output), labels(reference))

    again = run_script(*args)
    assert again.returncode == 0, again.stderr
    assert "already extracted and complete; not extracting again" in again.stdout
    assert "nothing to do" in again.stdout


def test_swapped_zips_missing_root_and_incomplete_layout_are_one_line_errors(root, source, tmp_path, capsys):
    require_converter()
    script = load_script()
    first_frames = sample_files(source, per_city=1)
    gtfine = write_zip(tmp_path / "gt.zip", source, [n for n in first_frames if n.parts[0] == "gtFine"])
    cases = [
        (["--gtfine", str(tmp_path / "nope.zip"), "--leftimg", str(gtfine)],
         f"--gtfine {tmp_path / 'nope.zip'}: no such file; expected the official gtFine_trainvaltest.zip"),
        (["--leftimg", str(gtfine)], f"--leftimg {gtfine}: no leftImg8bit/ members"),
        (["--skip-extract", "--root", str(tmp_path / "absent")], f"--root {tmp_path / 'absent'}: no such folder"),
        (["--skip-extract", "--root", str(root), "--expect-counts", "train=9"],
         f"{root / 'leftImg8bit' / 'train'} holds 8 *_leftImg8bit.png frames, expected 9"),
        (["--skip-extract", "--root", str(root), "--expect-counts", "train=8,val=500"],
         f"{root / 'leftImg8bit' / 'val'} is missing"),
    ]
    for argv, message in cases:
        assert script.main(argv + ["--workers", "1", "--no-progress"]) == 2, argv
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("error: ") and message in error, (argv, error)
    assert not outputs(root)  # nothing was converted on the way to those errors

    (root / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_polygons.json").unlink()
    assert script.main(["--skip-extract", "--root", str(root), "--expect-counts", "train=8", "--no-progress"]) == 2
    assert "1 frame(s) without *_gtFine_polygons.json, e.g. aachen/aachen_000001_000019" in capsys.readouterr().err


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    script = load_script()
    for argv, message in [
        ([], "pass --gtfine and --leftimg"),
        (["--skip-extract", "--gtfine", "x.zip"], "--skip-extract cannot be combined"),
        (["--skip-extract", "--workers", "0"], "--workers 0: expected at least 1"),
        (["--skip-extract", "--expect-counts", "train"], "'train' is not SPLIT=COUNT"),
    ]:
        with pytest.raises(SystemExit) as exited:
            script.main(argv)
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, (argv, error)


def test_missing_converter_says_how_to_install_it(root, monkeypatch, capsys):
    script = load_script()
    # None in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "cityscapesscripts.preparation.json2labelImg", None)
    assert script.main(["--skip-extract", "--root", str(root), "--expect-counts", "train=8", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install cityscapesscripts" in error
    assert not outputs(root)


def test_a_failing_conversion_is_reported_not_hung(root):
    # The converter calls sys.exit() on an unknown label; in a pool worker that must become a report, not a
    # dead worker and a pool waiting forever (run_script's timeout would catch a hang).
    require_converter()
    polygons = root / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_polygons.json"
    text = polygons.read_text()
    polygons.write_text(text.replace('"label": "road"', '"label": "no-such-label"', 1))
    assert '"no-such-label"' in polygons.read_text()
    result = run_script("--skip-extract", "--root", str(root), "--expect-counts", "train=8", "--workers", "2")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"1 of 8 conversions failed, e.g. {polygons}: ERROR: Label 'no-such-label' not known." in result.stderr
    assert len(outputs(root)) == 7 and not [p for p in root.rglob(".*")]
