"""The README's promises: the backbone table is what the code computes, and Quick start has exactly the two
command lines (train on the toy data, run the tests) that CI reads and runs verbatim, followed by evaluation and
prediction whose outputs .ci/check_outputs.py checks (and those checks can fail)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.models.complexity import backbone_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_command(marker: str) -> list:
    block = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```\n<!-- /{marker} -->", README, re.S)
    assert block, f"README has no {marker} block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_backbone_table_matches_the_models():
    assert backbone_table() in README


def test_quick_start_has_one_train_and_one_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert quick_start.count("```bash") == 2
    train, tests = fenced_command("train-command"), fenced_command("test-command")
    assert len(train) == 1 and "pip install -e ." in train[0] and train[0].endswith("-m seg.train")
    assert len(tests) == 1 and '.[test]' in tests[0] and "pytest" in tests[0]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and "README.md" in ci


def _ci_readme_command(marker: str) -> str:
    """The line .ci/run's own extraction (its readme_command function) takes from README.md for ``marker``."""
    script = (ROOT / ".ci" / "run").read_text()
    function = re.search(r"^readme_command\(\) \{.*?^\}", script, re.S | re.M)
    assert function, ".ci/run has no readme_command function"
    result = subprocess.run(["bash", "-c", f"set -euo pipefail\n{function.group(0)}\nreadme_command {marker}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n")


def test_ci_follows_the_quick_start_verbatim_then_evaluates_and_predicts():
    # CI extracts the very lines a reader copies (not a hand-made copy of them) and runs them in this order.
    assert _ci_readme_command("train-command") == fenced_command("train-command")[0]
    assert _ci_readme_command("test-command") == fenced_command("test-command")[0]
    ci = "\n".join(line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if not line.lstrip().startswith("#"))  # what runs, not what the comments say
    order = ['step bash -c "$train_command"', "-m seg.eval --ms-flip", "-m seg.predict", 'bash -c "$test_command"']
    positions = [ci.find(text) for text in order]
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions))
    # Both commands create .venv the same way, so the second one reuses (and extends) the first one's.
    train, tests = fenced_command("train-command")[0], fenced_command("test-command")[0]
    assert train.startswith("python3 -m venv .venv && ") and tests.startswith("python3 -m venv .venv && ")
    # The run directory CI checks is the one the README says the quick start leaves.
    assert "outputs/toy_resnest14" in README and "RUN_DIR=outputs/toy_resnest14" in ci


def test_ci_syntax():
    result = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- .ci/check_outputs.py: the sanity checks pass on good outputs and fail on bad ones --------------------


@pytest.fixture(scope="module")
def check_outputs():
    spec = importlib.util.spec_from_file_location("check_outputs", ROOT / ".ci" / "check_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy_checkpoint(tmp_path):
    """A seg checkpoint of a card with the toy classes (only its class count is read by the mask check)."""
    from prediction_stub import card_checkpoint

    return card_checkpoint(tmp_path / "best.pth", "toy", 4)


def _eval_json(path: Path, checkpoint: Path, **overrides) -> Path:
    record = {"pixAcc": 0.95, "mIoU": 0.86, "mAcc": 0.9, "fwIoU": 0.91, "checkpoint": str(checkpoint),
              "inference": {"mode": "slide", "scales": [0.5, 1.0, 1.5], "flip": True}, **overrides}
    path.write_text(json.dumps(record))
    return path


def test_eval_check_accepts_sane_metrics_and_refuses_the_rest(check_outputs, toy_checkpoint, tmp_path):
    good = _eval_json(tmp_path / "good.json", toy_checkpoint)
    assert "mIoU 0.8600" in check_outputs.check_eval(good, toy_checkpoint, 0.5)
    failures = {
        "below the floor": _eval_json(tmp_path / "low.json", toy_checkpoint, mIoU=0.19),
        "not a probability": _eval_json(tmp_path / "big.json", toy_checkpoint, mIoU=86.0),
        "NaN": _eval_json(tmp_path / "nan.json", toy_checkpoint, pixAcc=float("nan")),
        "another checkpoint": _eval_json(tmp_path / "other.json", tmp_path / "last.pth"),
        "single scale": _eval_json(tmp_path / "single.json", toy_checkpoint,
                                   inference={"scales": [1.0], "flip": False}),
        "missing file": tmp_path / "absent.json",
    }
    for reason, path in failures.items():
        with pytest.raises(check_outputs.CheckFailed):
            check_outputs.check_eval(path, toy_checkpoint, 0.5)
            pytest.fail(f"accepted an eval JSON with {reason}")


def test_mask_check_refuses_missing_misshapen_and_out_of_range_masks(check_outputs, toy_checkpoint, tmp_path):
    images, truth, masks = tmp_path / "images", tmp_path / "truth", tmp_path / "masks"
    assert "toy scenes" in check_outputs.write_images(images, truth, tmp_path / "no_samples_here")
    masks.mkdir()
    for image in images.iterdir():  # perfect predictions: the true masks themselves
        (masks / image.name).write_bytes((truth / image.name).read_bytes())
    assert "toy-scene mIoU 1.0000" in check_outputs.check_masks(images, masks, toy_checkpoint, truth, 0.5)

    victim = masks / sorted(p.name for p in images.iterdir())[0]
    original = victim.read_bytes()
    height, width = np.asarray(Image.open(victim)).shape
    corruptions = {
        "missing": lambda: victim.unlink(),
        "wrong size": lambda: Image.fromarray(np.zeros((height, width + 1), np.uint8)).save(victim),
        "out of range": lambda: Image.fromarray(np.full((height, width), 4, np.uint8)).save(victim),
        "RGB": lambda: Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(victim),
    }
    for reason, corrupt in corruptions.items():
        corrupt()
        with pytest.raises(check_outputs.CheckFailed):
            check_outputs.check_masks(images, masks, toy_checkpoint, truth, 0.5)
            pytest.fail(f"accepted a mask that is {reason}")
        victim.write_bytes(original)

    for image in images.iterdir():  # an untrained model's answer: background everywhere
        Image.fromarray(np.zeros_like(np.asarray(Image.open(truth / image.name)))).save(masks / image.name)
    with pytest.raises(check_outputs.CheckFailed, match="mIoU"):
        check_outputs.check_masks(images, masks, toy_checkpoint, truth, 0.5)
