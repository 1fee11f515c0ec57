"""``python -m seg.eval``: outputs, saved predictions in the dataset's own ids, and metrics that agree with
independent implementations (a hand-built reference; the official Cityscapes evaluator)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from seg.data import build_dataset
from seg.engine.checkpoint import save_checkpoint
from seg.models import build_segmentor


def run_eval(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "seg.eval", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def dataset_width(index: int) -> int:
    return build_dataset("toy", "val").load(index)["image"].shape[1]


def test_eval_writes_table_json_confusion_and_predictions(tiny_training_run, tmp_path):
    output, _ = tiny_training_run
    result = run_eval("--checkpoint", str(output / "best.pth"), "--limit", "5", "--json", str(tmp_path / "m.json"),
                      "--save-pred", str(tmp_path / "pred"), "--save-overlay", "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0].startswith(f"evaluating {output / 'best.pth'} on toy val (5 images)")
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("mIoU", "pixAcc", "mAcc", "fwIoU", "mIoU_all_classes"):
        assert 0 <= metrics[key] <= 1
    assert set(metrics["per_class"]) == {"background", "disc", "box", "stripe"}
    assert (tmp_path / "m_confusion.png").is_file() and (tmp_path / "m_per_class_iou.png").is_file()
    saved = sorted((tmp_path / "pred").glob("*.png"))
    assert [p.name for p in saved if "_" not in p.name] == [f"{i:04d}.png" for i in range(5)]
    for i in range(5):  # --save-overlay: the overlay and image | ground truth | prediction panels per image
        assert (tmp_path / "pred" / f"{i:04d}_overlay.png").is_file()
        assert Image.open(tmp_path / "pred" / f"{i:04d}_panels.png").size[0] > 2 * dataset_width(i)
    assert metrics["inference"]["base_size"] == 64  # the training base size, by default

    # The numbers equal a reference computed pixel by pixel from the saved predictions.
    dataset = build_dataset("toy", "val")
    inter, union, correct, labelled = np.zeros(4), np.zeros(4), 0, 0
    for index in range(5):
        prediction = np.asarray(Image.open(tmp_path / "pred" / f"{index:04d}.png"))
        target = dataset.load(index)["mask"]
        assert prediction.shape == target.shape
        correct += (prediction == target).sum()
        labelled += target.size
        for c in range(4):
            inter[c] += ((prediction == c) & (target == c)).sum()
            union[c] += ((prediction == c) | (target == c)).sum()
    assert abs(metrics["pixAcc"] - correct / labelled) < 1e-6
    assert abs(metrics["mIoU"] - np.mean(inter[union > 0] / union[union > 0])) < 1e-6


def test_without_checkpoint_the_latest_run_is_evaluated(tiny_training_run, tmp_path):
    output, _ = tiny_training_run
    run_dir = tmp_path / "outputs" / "toy_resnest14"
    run_dir.mkdir(parents=True)
    (run_dir / "best.pth").write_bytes((output / "best.pth").read_bytes())
    result = run_eval("--ms-flip", "--scales", "0.75,1.0", "--limit", "2", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.splitlines()[0]
    assert first.startswith("evaluating outputs/toy_resnest14/best.pth on toy val") and "flip True" in first


def test_cityscapes_class_iou_agrees_with_the_official_evaluator(shared, tmp_path, monkeypatch):
    evaluator = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
                                    reason="cityscapesscripts (test extra) provides the official evaluator")
    root = shared("data", "cityscapes")
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=19).eval()
    checkpoint = tmp_path / "cityscapes.pth"
    save_checkpoint({"model": model.state_dict(), "config": {"dataset": "cityscapes"},
                     "model_config": {"segmentor": "deeplabv3", "backbone": "resnest14", "num_classes": 19,
                                      "output_stride": 8, "aux": True}}, checkpoint)
    result = run_eval("--checkpoint", str(checkpoint), "--data-root", str(root), "--split", "val", "--json",
                      str(tmp_path / "m.json"), "--save-pred", str(tmp_path / "pred"), "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    ours = json.loads((tmp_path / "m.json").read_text())["per_class"]

    prediction = tmp_path / "pred" / "frankfurt_000000_000294_leftImg8bit.png"
    ground_truth = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png"
    assert set(np.unique(np.asarray(Image.open(prediction)))) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25,
                                                                   26, 27, 28, 31, 32, 33}  # official label ids
    if not hasattr(np, "in1d"):  # removed in NumPy 2.4; the evaluator (2.3.0) still calls it, always reshaping
        monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel(),
                            raising=False)
    args = evaluator.args
    args.quiet, args.JSONOutput, args.evalPixelAccuracy = True, False, True
    args.evalInstLevelScore = False  # the sample ships no instanceIds; class IoU does not need them
    args.exportFile = str(tmp_path / "official.json")
    official = evaluator.evaluateImgLists([str(prediction)], [str(ground_truth)], args)["classScores"]
    compared = 0
    for name, scores in ours.items():
        if np.isnan(official[name]):  # the official evaluator leaves classes absent from the GT undefined
            continue
        assert abs(scores["IoU"] - official[name]) < 1e-6, name
        compared += 1
    assert compared >= 8


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "/nonexistent.pth", "--dataset", "toy"], "/nonexistent.pth does not exist"),
        (["--scales", "0.5,-1"], "expected comma-separated positive numbers"),
        (["--dataset", "coco", "--checkpoint", "x.pth"], "--dataset 'coco' is unknown"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(args, message):
    result = run_eval(*args, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_pytorch_encoding_checkpoint_is_evaluated_with_backbone_and_dataset(tmp_path):
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=4).eval()
    renames = {"backbone.": "pretrained.", "aux_head.": "auxlayer.", "head.": "head."}
    encoding = {next(theirs + key[len(ours):] for ours, theirs in renames.items() if key.startswith(ours)): value
                for key, value in model.state_dict().items()}
    path = tmp_path / "deeplab_resnest14_toy-00000000.pth"
    torch.save(encoding, path)
    result = run_eval("--checkpoint", str(path), "--backbone", "resnest14", "--dataset", "toy", "--limit", "2",
                      "--json", str(tmp_path / "m.json"), "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"evaluating {path} on toy val (2 images)")
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["pixAcc"] <= 1


def test_a_split_without_labels_is_predicted_and_saved(shared, tmp_path):
    """Cityscapes test images have no public labels: masks are None, predictions are still written."""
    source = shared("data", "cityscapes", "leftImg8bit", "val", "frankfurt")
    root = tmp_path / "cityscapes"
    (root / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    for image in source.glob("*_leftImg8bit.png"):
        (root / "leftImg8bit" / "test" / "berlin" / image.name).write_bytes(image.read_bytes())
    torch.manual_seed(0)
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=19).eval()
    checkpoint = tmp_path / "cityscapes.pth"
    save_checkpoint({"model": model.state_dict(), "config": {"dataset": "cityscapes"},
                     "model_config": {"segmentor": "deeplabv3", "backbone": "resnest14", "num_classes": 19,
                                      "output_stride": 8, "aux": True}}, checkpoint)
    result = run_eval("--checkpoint", str(checkpoint), "--data-root", str(root), "--split", "test",
                      "--save-pred", str(tmp_path / "pred"), "--json", str(tmp_path / "m.json"), "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = list((tmp_path / "pred").glob("*.png"))
    assert len(saved) == 1 and np.asarray(Image.open(saved[0])).shape == (128, 256)


def test_an_unreadable_validation_image_is_one_line_naming_it_whatever_the_workers(tmp_path):
    """A truncated val image read in a DataLoader worker: the user sees the file and why, not a worker traceback."""
    root = tmp_path / "folder"
    for kind in ("images", "masks"):
        (root / kind / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\nd\n")
    rng = np.random.default_rng(0)
    for name in ("x", "y"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / "val" / f"{name}.png")
        Image.fromarray(rng.integers(0, 4, (40, 48), dtype=np.uint8)).save(root / "masks" / "val" / f"{name}.png")
    bad = root / "images" / "val" / "y.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=4)
    checkpoint = save_checkpoint(
        {"model": model.state_dict(), "classes": ["a", "b", "c", "d"], "palette": [[0, 0, 0]] * 4,
         "config": {"dataset": "folder"},
         "model_config": {"segmentor": "deeplabv3", "backbone": "resnest14", "num_classes": 4}},
        tmp_path / "four.pth")
    for workers in ("0", "1"):
        result = run_eval("--checkpoint", str(checkpoint), "--dataset", "folder", "--data-root", str(root),
                          "--workers", workers, "--device", "cpu", timeout=300)
        assert result.returncode == 2, (workers, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "worker" not in result.stderr, (workers, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: {bad}: ") and "truncated" in lines[-1], (workers, lines[-1])
