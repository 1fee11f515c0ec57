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

import seg.eval as seg_eval
from seg.data import build_dataset, eval_transforms
from seg.data.base import IGNORE_INDEX
from seg.engine.evaluator import evaluate
from seg.engine.inference import InferenceConfig, inference_model
from seg.models import build_segmentor
from prediction_stub import PredictionStub, card_checkpoint


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


def noisy_prediction(train_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A wrong but plausible prediction made from ground-truth train ids: every boundary shifted, pairs of
    classes swapped inside rectangles, one class taken for another over the left half; ignored pixels become
    road. Every class present keeps some of its pixels and loses others, so its IoU is strictly between 0 and 1."""
    height, width = train_ids.shape
    prediction = np.roll(train_ids, (int(rng.integers(4, 9)), int(rng.integers(6, 13))), axis=(0, 1))
    present = np.unique(train_ids[train_ids != IGNORE_INDEX])
    for _ in range(4):
        a, b = rng.choice(present, 2, replace=False)
        top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        window = prediction[top : top + height // 3, left : left + width // 3]
        window[...] = np.where(window == a, b, np.where(window == b, a, window))
    taken, instead = rng.choice(present, 2, replace=False)
    left_half = prediction[:, : width // 2]
    left_half[left_half == taken] = instead
    prediction[prediction == IGNORE_INDEX] = 0
    return prediction


def test_cityscapes_class_iou_agrees_with_the_official_evaluator(shared, tmp_path, monkeypatch):
    """seg.eval's per-class IoU and mIoU against cityscapesScripts' evaluator on the label-id PNGs it saves, for
    predictions that hit most classes partly (ground truth with structured noise): a wrong id mapping in reading
    the ground truth or in saving the predictions changes some class's IoU on one side only."""
    evaluator = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
                                    reason="cityscapesscripts (test extra) provides the official evaluator")
    labels = pytest.importorskip("cityscapesscripts.helpers.labels", reason="cityscapesscripts (test extra)")
    source = shared("data", "cityscapes")
    to_train_id = np.full(256, IGNORE_INDEX, np.uint8)
    for label in labels.labels:
        if label.id >= 0 and 0 <= label.trainId < IGNORE_INDEX:
            to_train_id[label.id] = label.trainId
    # The 8 train frames at half resolution (every other pixel: label ids stay exact; a quarter of the softmax
    # and argmax time), with label-id files only, so that seg reads the files the official evaluator scores.
    root = tmp_path / "cityscapes"
    originals = sorted((source / "gtFine" / "train").rglob("*_gtFine_labelIds.png"))
    frames = [gt.name[: -len("_gtFine_labelIds.png")] for gt in originals]
    ground_truths = [root / gt.relative_to(source) for gt in originals]
    for original, gt, frame in zip(originals, ground_truths, frames):
        image = source / "leftImg8bit" / "train" / original.parent.name / f"{frame}_leftImg8bit.png"
        for source_file, written in ((image, root / image.relative_to(source)), (original, gt)):
            written.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(Image.open(source_file))[::2, ::2]).save(written, compress_level=1)
    rng = np.random.default_rng(0)
    predictions = [noisy_prediction(to_train_id[np.asarray(Image.open(gt))], rng) for gt in ground_truths]

    stub = PredictionStub(predictions, 19)
    monkeypatch.setattr(seg_eval, "load_model", lambda card, weights, source: stub)
    for plot in ("save_confusion_matrix", "save_per_class_iou"):  # not compared here; tested elsewhere
        monkeypatch.setattr(seg_eval, plot, lambda *args, **kwargs: None)
    checkpoint = card_checkpoint(tmp_path / "stub.pth", "cityscapes", 19)
    code = seg_eval.main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--split", "train",
                          "--base-size", "1024", "--json", str(tmp_path / "m.json"), "--save-pred",
                          str(tmp_path / "pred"), "--workers", "0", "--device", "cpu"])
    assert code == 0 and stub.calls == len(frames) == 8
    ours = json.loads((tmp_path / "m.json").read_text())

    for name, value in (("quiet", True), ("JSONOutput", False), ("evalPixelAccuracy", False),
                        ("evalInstLevelScore", False),  # the samples ship no instanceIds; class IoU needs none
                        ("exportFile", str(tmp_path / "official.json")), ("evalLabels", evaluator.args.evalLabels)):
        monkeypatch.setattr(evaluator.args, name, value)  # the evaluator's settings are a module global
    saved = [str(tmp_path / "pred" / f"{frame}_leftImg8bit.png") for frame in frames]
    official = evaluator.evaluateImgLists(saved, [str(gt) for gt in ground_truths], evaluator.args)
    partly_right = 0
    for name, scores in ours["per_class"].items():
        theirs = official["classScores"][name]
        if np.isnan(theirs):  # absent from both ground truth and prediction
            assert np.isnan(scores["IoU"]), name
            continue
        assert 0 < theirs < 1, name
        assert abs(scores["IoU"] - theirs) < 1e-9, name
        partly_right += 1
    assert partly_right >= 12
    assert abs(ours["mIoU"] - official["averageScoreClasses"]) < 1e-9


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


def toy_val_predictions(model: torch.nn.Module, images: int):
    """The metrics and (H, W) predictions of ``model`` on the first toy val images, by seg.eval's own path
    (inference model, whole image at the toy base size)."""
    dataset = build_dataset("toy", "val", transforms=eval_transforms())
    dataset.samples = dataset.samples[:images]
    found = {}
    metrics = evaluate(inference_model(model, "cpu"), dataset, torch.device("cpu"), InferenceConfig(base_size=128),
                       workers=0, progress=False, on_prediction=lambda i, p: found.__setitem__(i, p.numpy()))
    return metrics, [found[i] for i in range(images)]


def test_a_pytorch_encoding_checkpoint_is_evaluated_with_its_own_weights(tmp_path, randomize_batchnorm, capsys):
    """A PyTorch-Encoding state dict with --backbone and --dataset: what seg.eval predicts is what the model the
    file was written from predicts, and not what another model of the same architecture predicts."""
    torch.manual_seed(0)
    model = randomize_batchnorm(build_segmentor("deeplabv3", backbone="resnest14", num_classes=4), seed=0)
    renames = {"backbone.": "pretrained.", "aux_head.": "auxlayer.", "head.": "head."}
    encoding = {next(theirs + key[len(ours):] for ours, theirs in renames.items() if key.startswith(ours)): value
                for key, value in model.state_dict().items()}
    path = tmp_path / "deeplab_resnest14_toy-00000000.pth"
    torch.save(encoding, path)
    code = seg_eval.main(["--checkpoint", str(path), "--backbone", "resnest14", "--dataset", "toy", "--limit", "2",
                          "--json", str(tmp_path / "m.json"), "--save-pred", str(tmp_path / "pred"), "--workers",
                          "0", "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out.startswith(f"evaluating {path} on toy val (2 images)")
    saved = [np.asarray(Image.open(tmp_path / "pred" / f"{i:04d}.png")) for i in range(2)]

    expected_metrics, expected = toy_val_predictions(model, 2)
    torch.manual_seed(1)
    other = build_segmentor("deeplabv3", backbone="resnest14", num_classes=4)
    _, others = toy_val_predictions(randomize_batchnorm(other, seed=1), 2)
    for prediction, own, another in zip(saved, expected, others):
        assert len(np.unique(own)) >= 2  # varied predictions: the comparisons below can tell models apart
        assert np.array_equal(prediction, own)
        assert (prediction != another).mean() > 0.2
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["pixAcc"] == expected_metrics["pixAcc"] and metrics["mIoU"] == expected_metrics["mIoU"]


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
    card_checkpoint(checkpoint, "cityscapes", 19, weights=model.state_dict())
    # --base-size 256, the frame's own width: the recipe's 2048 would run the network at 64 times the pixels.
    result = run_eval("--checkpoint", str(checkpoint), "--data-root", str(root), "--split", "test",
                      "--base-size", "256", "--save-pred", str(tmp_path / "pred"), "--json", str(tmp_path / "m.json"),
                      "--workers", "0")
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
    checkpoint = card_checkpoint(tmp_path / "four.pth", "folder", 4, weights=model.state_dict())
    for workers in ("0", "1"):
        result = run_eval("--checkpoint", str(checkpoint), "--dataset", "folder", "--data-root", str(root),
                          "--workers", workers, "--device", "cpu", timeout=300)
        assert result.returncode == 2, (workers, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "worker" not in result.stderr, (workers, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: {bad}: ") and "truncated" in lines[-1], (workers, lines[-1])
