"""``python -m seg.data check``: every problem of a dataset at once, with file names; clean data passes."""

from __future__ import annotations

import io
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

from seg.data import build_dataset
from seg.data.__main__ import main


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "seg.data", "check", "--quiet", *args],
                          capture_output=True, text=True, timeout=120)


def write_pair(root, name, mask, image_size=None):
    height, width = image_size or mask.shape
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / "images" / "train" / f"{name}.jpg")
    if mask is not None:
        Image.fromarray(mask).save(root / "masks" / "train" / f"{name}.png")


def test_reports_every_problem_at_once(tmp_path):
    for folder in ("images/train", "masks/train"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("background\nroad\nsky\n")
    good = np.zeros((16, 16), np.uint8)
    good[:4] = 1
    good[4:8] = 2
    write_pair(tmp_path, "good", good)
    write_pair(tmp_path, "no_mask", None, (16, 16))
    write_pair(tmp_path, "bad_values", np.full((16, 16), 7, np.uint8))
    write_pair(tmp_path, "wrong_size", good, (20, 16))
    (tmp_path / "images" / "train" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    Image.fromarray(good).save(tmp_path / "masks" / "train" / "truncated.png")

    result = run_check("--dataset", "folder", "--data-root", str(tmp_path), "--split", "train")
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "folder train: 4 samples, 4 problem(s)" in out
    assert "no_mask.jpg: image without a mask" in out
    assert "bad_values.png: label values 7 are outside" in out
    assert "wrong_size.png: mask is 16x16 but its image" in out
    assert "truncated.jpg: not a readable image" in out
    assert "Traceback" not in result.stderr


def test_binary_0_255_masks_are_called_out(tmp_path):
    for folder in ("images/train", "masks/train"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("background\nlesion\n")
    mask = np.zeros((16, 16), np.uint8)
    mask[5:9] = 255
    write_pair(tmp_path, "a", mask)
    result = run_check("--dataset", "folder", "--data-root", str(tmp_path), "--split", "train")
    assert result.returncode == 1
    assert "0/255 binary masks? store the foreground as 1" in result.stdout


def test_clean_real_dataset_passes_and_missing_root_is_one_line(shared, tmp_path):
    result = run_check("--dataset", "camvid", "--data-root", str(shared("data", "camvid")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "camvid train: 367 samples, 0 problem(s)" in result.stdout
    assert "camvid val: 101 samples, 0 problem(s)" in result.stdout
    missing = run_check("--dataset", "ade20k", "--data-root", str(tmp_path / "none"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "ade20k data not found at" in missing.stderr
    unknown = run_check("--dataset", "coco")
    assert unknown.returncode == 2 and "--dataset 'coco' is unknown" in unknown.stderr


def test_awkward_but_valid_files_pass_and_broken_ones_are_named(tmp_path, capsys):
    """Through the folder dataset and the check, in-process: a non-ASCII name whose mask was saved in decomposed
    Unicode (as macOS writes it), CMYK, 16-bit, palette and RGBA images are all fine; a 0-byte image and a
    truncated mask are each one problem line naming the file."""
    for folder in ("images/train", "masks/train"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("background\nroad\nsky\n")
    mask = np.zeros((16, 16), np.uint8)
    mask[:5], mask[5:9] = 1, 2
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    images = tmp_path / "images" / "train"
    masks = tmp_path / "masks" / "train"
    name = "café_日本"
    Image.fromarray(rgb).save(images / f"{unicodedata.normalize('NFC', name)}.jpg")
    Image.fromarray(mask).save(masks / f"{unicodedata.normalize('NFD', name)}.png")
    for stem, image in {"cmyk": Image.fromarray(rgb).convert("CMYK"), "palette": Image.fromarray(rgb).quantize(8),
                        "rgba": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
                        "sixteen": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)}.items():
        image.save(images / f"{stem}.{'jpg' if stem == 'cmyk' else 'png'}")
        Image.fromarray(mask).save(masks / f"{stem}.png")
    (images / "empty.png").write_bytes(b"")
    Image.fromarray(mask).save(masks / "empty.png")
    Image.fromarray(rgb).save(images / "cut.png")
    encoded = io.BytesIO()
    Image.fromarray(mask).save(encoded, "PNG")
    (masks / "cut.png").write_bytes(encoded.getvalue()[:40])  # IHDR kept, pixel data cut

    dataset = build_dataset("folder", "train", root=tmp_path)
    assert len(dataset) == 7  # the NFC image and the NFD mask paired
    index = [Path(s.image).stem for s in dataset.samples].index(unicodedata.normalize("NFC", name))
    assert np.array_equal(dataset.load(index)["mask"], mask)

    status = main(["check", "--dataset", "folder", "--data-root", str(tmp_path), "--split", "train", "--quiet"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "folder train: 7 samples, 2 problem(s)" in out
    assert f"{images / 'empty.png'}: empty file (0 bytes)" in out
    assert f"{masks / 'cut.png'}: not a readable mask" in out
