"""Bad input to the inference, training and data CLIs: one line on stderr naming the flag or file and what was
expected, exit status 2, no traceback, and nothing heavy built first.

Each case calls the CLI's ``main(argv)`` in-process (cheap); one test runs real processes to show what a user
sees. Checkpoints here are small fakes: every mistake must be caught before a model is built.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from seg.bench import main as bench_main
from seg.data.__main__ import main as data_main
from seg.engine.checkpoint import save_checkpoint
from seg.cli import MAX_CROP_SIZE
from seg.eval import main as eval_main
from seg.export import main as export_main
from seg.predict import main as predict_main
from seg.train import main as train_main

CLIS: Dict[str, Callable] = {"eval": eval_main, "predict": predict_main, "export": export_main,
                             "data": data_main, "train": train_main, "bench": bench_main}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, Path]:
    """Bad checkpoints of every kind, a 4-class seg checkpoint (weights left out: never built), a 3-class folder
    dataset, an empty one, an image and a regular file standing where folders are expected."""
    root = tmp_path_factory.mktemp("cli_errors")
    made = {name: root / f"{name}.pth" for name in ("random", "text", "empty", "state_dict")}
    made["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    made["text"].write_text("model weights: see the wiki\n")
    made["empty"].write_bytes(b"")
    torch.save({"conv.weight": torch.zeros(2, 3, 1, 1)}, made["state_dict"])
    made["folder_checkpoint"] = root / "folder_checkpoint.pth"
    made["folder_checkpoint"].mkdir()
    made["four_classes"] = save_checkpoint(
        {"model": {}, "classes": ["a", "b", "c", "d"], "palette": [[0, 0, 0]] * 4, "config": {"dataset": "toy"},
         "model_config": {"segmentor": "deeplabv3", "backbone": "resnest14", "num_classes": 4}},
        root / "four_classes.pth")
    data = root / "three_classes"
    for split in ("images/val", "masks/val"):
        (data / split).mkdir(parents=True)
    (data / "classes.txt").write_text("sky\nroad\ncar\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "images" / "val" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "masks" / "val" / "a.png")
    made["three_classes"] = data
    empty_splits = root / "empty_splits"
    for split in ("images/train", "masks/train", "images/val", "masks/val"):
        (empty_splits / split).mkdir(parents=True)
    (empty_splits / "classes.txt").write_text("a\nb\n")
    made["empty_splits"] = empty_splits
    made["empty_root"] = root / "empty_root"
    made["empty_root"].mkdir()
    made["no_images"] = root / "no_images"
    made["no_images"].mkdir()
    (made["no_images"] / "notes.txt").write_text("not an image")
    made["image"] = root / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(made["image"])
    (root / "twin").mkdir()
    made["twin_image"] = root / "twin" / "image.jpg"  # same stem as image.png: its mask would overwrite
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(made["twin_image"])
    made["a_file"] = root / "a_file"
    made["a_file"].write_text("I am a file")
    made["missing"] = root / "missing"
    made["train_output"] = root / "train_output"  # train creates it before it meets a missing --resume
    return made


def one_line_error(cli: str, argv: List[str], capsys) -> str:
    """Run ``cli``'s main in-process; assert exit status 2, one stderr line and no traceback; return the line."""
    try:
        status = CLIS[cli](argv)
    except SystemExit as exit_:  # argparse's error path
        status = exit_.code
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, f"exit status {status}, stderr: {stderr[-1000:]}"
    assert "Traceback" not in stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-1000:]}"
    assert "error:" in lines[0]
    return lines[0]


def expand(argv: List[str], files: Dict[str, Path]) -> List[str]:
    """``{name}`` placeholders -> the fixture's paths."""
    return [arg.format(**{k: str(v) for k, v in files.items()}) for arg in argv]


BAD_CHECKPOINTS = [  # (file, what the message must say besides the file name)
    ("random", "not a readable seg checkpoint"),
    ("text", "not a readable seg checkpoint"),
    ("empty", "is empty (0 bytes); expected a checkpoint"),
    ("folder_checkpoint", "is a folder without config.json; expected a checkpoint file"),
    ("state_dict", "is not a seg checkpoint"),
    ("missing", "does not exist"),
]

CHECKPOINT_CASES = [
    pytest.param(cli, argv, [f"{{{name}}}", message], id=f"{cli}-checkpoint-{name}")
    for name, message in BAD_CHECKPOINTS
    for cli, argv in [
        ("eval", ["--checkpoint", f"{{{name}}}", "--dataset", "toy", "--workers", "0"]),
        ("predict", ["{image}", "--checkpoint", f"{{{name}}}", "--out", "{missing}/out", "--device", "cpu"]),
        ("export", ["--checkpoint", f"{{{name}}}", "--format", "torchscript", "--out", "{missing}/m.pt"]),
    ]
]

EVAL = ["--checkpoint", "{four_classes}", "--workers", "0", "--device", "cpu"]
PREDICT = ["{image}", "--checkpoint", "{four_classes}", "--out", "{missing}/out", "--device", "cpu"]
EXPORT = ["--checkpoint", "{four_classes}", "--format", "torchscript"]

CASES = CHECKPOINT_CASES + [
    # Unknown names list the choices.
    pytest.param("eval", [*EVAL, "--dataset", "coco"], ["--dataset 'coco' is unknown", "ade20k, camvid"],
                 id="eval-unknown-dataset"),
    pytest.param("eval", [*EVAL, "--backbone", "resnest7"], ["--backbone 'resnest7' is unknown", "resnest50,"],
                 id="eval-unknown-backbone"),
    pytest.param("data", ["check", "--dataset", "coco"], ["--dataset 'coco' is unknown", "cityscapes, folder"],
                 id="data-unknown-dataset"),
    pytest.param("export", [*EXPORT, "--format", "tflite", "--out", "{missing}/m"], ["--format", "'tflite'"],
                 id="export-unknown-format"),
    # argparse's own checks are one line too (its default prints the whole usage first).
    pytest.param("train", ["--iters", "x"], ["--iters", "invalid int value: 'x'"], id="train-iters-not-a-number"),
    pytest.param("train", ["--dataset", "coco"], ["--dataset 'coco' is unknown", "ade20k, camvid"],
                 id="train-unknown-dataset"),
    pytest.param("train", ["--amp", "fp8"], ["--amp", "'fp8'", "bf16"], id="train-unknown-amp"),
    pytest.param("train", ["--backbone", "resnest51", "--output-dir", "{train_output}"],
                 ["--backbone 'resnest51' is unknown", "resnest50,"], id="train-unknown-backbone"),
    # Values the config rejects: the library names the setting (seg.config.ConfigError), the CLI its flag.
    pytest.param("train", ["--crop-size", "0", "--output-dir", "{train_output}"],
                 ["error: --crop-size must be positive, got 0"], id="train-crop-size-0"),
    pytest.param("train", ["--batch-size", "0", "--output-dir", "{train_output}"],
                 ["error: --batch-size must be positive, got 0"], id="train-batch-size-0"),
    pytest.param("train", ["--device", "tpu", "--output-dir", "{train_output}"],
                 ["error: --device must be auto, cpu or cuda, got 'tpu'"], id="train-unknown-device"),
    pytest.param("train", ["--config", "{missing}/run.toml", "--output-dir", "{train_output}"],
                 ["error: --config {missing}/run.toml: file not found"], id="train-missing-config"),
    pytest.param("bench", ["--threads", "x"], ["--threads", "invalid int value: 'x'"], id="bench-threads-not-a-number"),
    pytest.param("eval", [*EVAL, "--no-such-flag"], ["unrecognized arguments: --no-such-flag"],
                 id="eval-unknown-flag"),
    # Missing or empty data.
    pytest.param("eval", [*EVAL, "--dataset", "ade20k", "--data-root", "{missing}"],
                 ["ade20k data not found at", "missing"], id="eval-missing-root"),
    pytest.param("eval", [*EVAL, "--dataset", "folder", "--data-root", "{empty_root}"],
                 ["classes.txt: class list not found"], id="eval-empty-root"),
    pytest.param("eval", [*EVAL, "--dataset", "folder", "--data-root", "{empty_splits}"],
                 ["folder val split has no samples under", "empty_splits"], id="eval-empty-split"),
    pytest.param("train", ["--dataset", "ade20k", "--data-root", "{missing}", "--output-dir", "{train_output}"],
                 ["ade20k data not found at {missing}"], id="train-missing-root"),
    pytest.param("data", ["check", "--dataset", "camvid", "--data-root", "{missing}"],
                 ["camvid data not found at", "missing"], id="data-missing-root"),
    pytest.param("data", ["check", "--dataset", "folder", "--data-root", "{empty_root}"],
                 ["classes.txt: class list not found"], id="data-empty-root"),
    pytest.param("data", ["check", "--dataset", "folder", "--data-root", "{empty_splits}", "--quiet"],
                 ["split(s) train, val hold no image/mask pair"], id="data-empty-splits"),
    pytest.param("data", ["check", "--dataset", "folder", "--data-root", "{three_classes}", "--split", "dev"],
                 ["unknown split 'dev'"], id="data-unknown-split"),
    pytest.param("predict", ["{missing}", *PREDICT[1:]], ["no image file", "missing: no such file or folder"],
                 id="predict-missing-input"),
    pytest.param("predict", ["{no_images}", *PREDICT[1:]], ["no image file (.jpg", "no_images"],
                 id="predict-no-image-in-folder"),
    # A checkpoint of another dataset: found before the model is built.
    pytest.param("eval", [*EVAL, "--dataset", "folder", "--data-root", "{three_classes}"],
                 ["four_classes.pth predicts 4 classes but folder has 3"], id="eval-class-count-mismatch"),
    # Crop sizes.
    *[pytest.param(cli, [*argv, "--crop-size", value], ["--crop-size", f"from 1 to {MAX_CROP_SIZE}", value],
                   id=f"{cli}-crop-size-{value}")
      for cli, argv in (("eval", EVAL), ("predict", PREDICT)) for value in ("0", "-3", str(MAX_CROP_SIZE + 1), "x")],
    *[pytest.param("export", [*EXPORT, "--out", "{missing}/m.pt", "--size", *size],
                   ["--size", f"from 32 to {MAX_CROP_SIZE}"], id=f"export-size-{'x'.join(size)}")
      for size in (("16", "64"), ("64", str(MAX_CROP_SIZE + 1)), ("0", "0"))],
    # Scales.
    *[pytest.param(cli, [*argv, "--scales", value], ["--scales", "expected comma-separated positive numbers",
                                                     value], id=f"{cli}-scales-{value}")
      for cli, argv in (("eval", EVAL), ("predict", PREDICT)) for value in ("0.5,-1", "abc", "0", "1,nan", "inf",
                                                                            "")],
    pytest.param("predict", ["{twin_image}", *PREDICT], ["{image}", "{twin_image}", "would both write image.png"],
                 id="predict-two-inputs-one-output-name"),
    pytest.param("predict", [*PREDICT, "--max-pixels", "-1"], ["--max-pixels", "at least 0"],
                 id="predict-max-pixels-negative"),
    # Outputs that cannot be written (we may run as root, so they are made unwritable by a file in the way).
    pytest.param("eval", [*EVAL, "--save-pred", "{a_file}"], ["--save-pred", "a_file is a file; expected a folder"],
                 id="eval-save-pred-is-a-file"),
    pytest.param("eval", [*EVAL, "--json", "{a_file}/m.json"], ["--json", "a_file is a file, not a folder"],
                 id="eval-json-under-a-file"),
    pytest.param("eval", [*EVAL, "--json", "{empty_root}"], ["--json", "empty_root is a folder; expected a file"],
                 id="eval-json-is-a-folder"),
    pytest.param("predict", [*PREDICT[:-4], "--out", "{a_file}"], ["--out", "a_file is a file; expected a folder"],
                 id="predict-out-is-a-file"),
    pytest.param("predict", [*PREDICT[:-4], "--out", "{a_file}/masks/deeper"],
                 ["--out", "cannot be created", "a_file is a file"], id="predict-out-under-a-file"),
    pytest.param("export", [*EXPORT, "--out", "{empty_root}"], ["--out", "empty_root is a folder; expected a file"],
                 id="export-out-is-a-folder"),
    pytest.param("export", [*EXPORT, "--out", "{a_file}/m.pt"], ["--out", "a_file is a file, not a folder"],
                 id="export-out-under-a-file"),
]


@pytest.mark.parametrize("cli,argv,expected", CASES)
def test_bad_input_is_one_line_exit_2(cli, argv, expected, files, capsys):
    started = time.perf_counter()
    line = one_line_error(cli, expand(argv, files), capsys)
    for part in expand(expected, files):
        assert part in line, f"{part!r} not in {line!r}"
    assert time.perf_counter() - started < 20, "the mistake must be caught before anything heavy runs"


def test_train_resume_of_a_missing_checkpoint_is_one_line(files, capsys):
    # The one mistake found after the model is built (the run resumes once it is set up), hence not in CASES.
    line = one_line_error("train", ["--resume", str(files["missing"] / "last.pth"), "--backbone", "resnest14",
                                    "--output-dir", str(files["train_output"])], capsys)
    assert f"checkpoint {files['missing'] / 'last.pth'} does not exist" in line


def test_the_same_mistakes_as_processes_print_no_traceback(files):
    """Real processes, side by side (each mostly imports torch): stderr is exactly one line, exit status 2.
    (``python -m seg.data check`` runs as a process in tests/data/test_check.py, ``python -m seg.train`` with a
    mistake in tests/engine/test_faults.py and test_training.py.)"""
    commands = {
        "eval": ["seg.eval", "--checkpoint", str(files["text"]), "--dataset", "toy", "--workers", "0"],
        "predict": ["seg.predict", str(files["image"]), "--checkpoint", str(files["four_classes"]), "--out",
                    str(files["a_file"]), "--scales", "0.5,-1"],
        "export": ["seg.export", "--checkpoint", str(files["random"]), "--format", "torchscript", "--out",
                   str(files["missing"] / "m.pt")],
    }
    processes = {name: subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for name, argv in commands.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
        assert len(stderr.strip().splitlines()) == 1, (name, stderr[-2000:])
