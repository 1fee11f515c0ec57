"""Sanity checks for .ci/run: what the README's quick start, ``seg.eval`` and ``seg.predict`` leave behind.

    python .ci/check_outputs.py training outputs/toy_resnest14
    python .ci/check_outputs.py eval RUN/eval_toy_val.json --checkpoint RUN/best.pth --min-miou 0.5
    python .ci/check_outputs.py images WORK/images --ground-truth TRUTH --samples ../shared/data
    python .ci/check_outputs.py masks WORK/images MASKS --checkpoint RUN/best.pth --ground-truth TRUTH --min-miou 0.5
    python .ci/check_outputs.py shared RUN/hf --checkpoint RUN/best.pth --images WORK/images
    python .ci/check_outputs.py served --command "README'S SERVE LINE" --checkpoint RUN/best.pth --images WORK/images

Each prints ``CI: ok ...`` and exits 0, or prints every problem as ``CI: ...`` on stderr and exits 1. Run it with
the virtual environment's Python (it imports ``seg``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from seg.data.toy import toy_scene
from seg.engine.checkpoint import CheckpointError, checkpoint_card, load_checkpoint

RUN_FILES = ("best.pth", "last.pth", "log.jsonl", "curves.png", "prediction_overlay.png")
# Toy scenes for prediction: not square and not the 128 x 128 of the toy splits, so a mask of the wrong size shows;
# seeds far from the toy splits' (split seed x 1,000,003 + index), so the model has never seen them.
TOY_SCENE_SIZE = (144, 200)
TOY_SCENE_SEEDS = (7_000_001, 7_000_002, 7_000_003)
REAL_SAMPLE_GLOBS = ("ade20k/ADEChallengeData2016/images/validation/*.jpg",)
REAL_SAMPLES_PER_GLOB = 2


class CheckFailed(Exception):
    """One or more outputs are missing or not sane; the message lists them."""


def _fail_if(problems: List[str]) -> None:
    if problems:
        raise CheckFailed("\n".join(problems))


def check_training(run: Path) -> str:
    """The quick start's run folder holds every file the README lists, and the checkpoint is a finished run."""
    problems = [f"{run / name} is missing or empty" for name in RUN_FILES
                if not (run / name).is_file() or (run / name).stat().st_size == 0]
    _fail_if(problems)
    for picture in ("curves.png", "prediction_overlay.png"):
        with Image.open(run / picture) as image:
            image.verify()
    checkpoint = load_checkpoint(run / "last.pth")
    planned = checkpoint.get("config", {}).get("iters")
    if planned is None or checkpoint.get("iteration") != planned:
        problems.append(f"{run / 'last.pth'} stopped at iteration {checkpoint.get('iteration')} of {planned}")
    losses = [json.loads(line).get("loss") for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [loss for loss in losses if loss is not None]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        problems.append(f"{run / 'log.jsonl'}: {len(losses)} losses logged, not all finite")
    _fail_if(problems)
    return f"training run {run}: {planned} iterations, final loss {losses[-1]:.3f}"


def check_eval(json_path: Path, checkpoint: Path, min_miou: float) -> str:
    """seg.eval's JSON is for ``checkpoint`` and its scores are probabilities above ``min_miou``."""
    if not json_path.is_file():
        raise CheckFailed(f"{json_path} is missing: seg.eval wrote no metrics there")
    record = json.loads(json_path.read_text())
    problems = []
    if Path(record.get("checkpoint", "")).resolve() != checkpoint.resolve():
        problems.append(f"{json_path} evaluated {record.get('checkpoint')!r}, expected {checkpoint}")
    for key in ("pixAcc", "mIoU", "mAcc", "fwIoU"):
        value = record.get(key)
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            problems.append(f"{json_path}: {key} = {value!r}, expected a number in [0, 1]")
    miou = record.get("mIoU")
    if isinstance(miou, (int, float)) and not miou > min_miou:
        problems.append(f"{json_path}: mIoU {miou:.4f} is not above {min_miou} (the quick start should reach 0.85)")
    if not record.get("inference", {}).get("flip") or len(record.get("inference", {}).get("scales", [])) < 2:
        problems.append(f"{json_path}: inference {record.get('inference')} is not multi-scale + flip")
    _fail_if(problems)
    return f"eval {json_path}: mIoU {miou:.4f}, pixAcc {record['pixAcc']:.4f} (multi-scale + flip)"


def write_images(images: Path, ground_truth: Path, samples: Path) -> str:
    """Toy scenes (with their masks) and, when the shared samples are there, a few real photographs."""
    images.mkdir(parents=True, exist_ok=True)
    ground_truth.mkdir(parents=True, exist_ok=True)
    for seed in TOY_SCENE_SEEDS:
        image, mask = toy_scene(*TOY_SCENE_SIZE, seed=seed)
        Image.fromarray(image).save(images / f"toy_{seed}.png")
        Image.fromarray(mask).save(ground_truth / f"toy_{seed}.png")
    copied = []
    for pattern in REAL_SAMPLE_GLOBS:
        for path in sorted(samples.glob(pattern))[:REAL_SAMPLES_PER_GLOB]:
            shutil.copyfile(path, images / path.name)
            copied.append(path.name)
    real = f" and {len(copied)} real sample(s) from {samples}" if copied else f" ({samples} has no real samples)"
    return f"wrote {len(TOY_SCENE_SEEDS)} toy scenes{real} to {images}"


def check_masks(images: Path, masks: Path, checkpoint: Path, ground_truth: Path, min_miou: float) -> str:
    """One mask per image, at the image's size, with class ids only; on the toy scenes, mIoU above ``min_miou``."""
    num_classes = checkpoint_card(load_checkpoint(checkpoint), checkpoint).num_classes
    inputs = sorted(p for p in images.iterdir() if p.is_file())
    if not inputs:
        raise CheckFailed(f"{images} holds no images")
    problems = []
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for image_path in inputs:
        mask_path = masks / f"{image_path.stem}.png"
        if not mask_path.is_file():
            problems.append(f"{mask_path} is missing (the mask of {image_path})")
            continue
        with Image.open(image_path) as image, Image.open(mask_path) as mask_image:
            size, mask = image.size, np.asarray(mask_image)
        if mask.ndim != 2 or (mask.shape[1], mask.shape[0]) != size:
            problems.append(f"{mask_path} is {mask.shape}, expected one channel of {size[1]} x {size[0]}")
            continue
        if mask.max() >= num_classes:
            problems.append(f"{mask_path} holds class id {mask.max()}, expected 0..{num_classes - 1}")
            continue
        truth_path = ground_truth / image_path.name
        if truth_path.is_file():
            truth = np.asarray(Image.open(truth_path)).astype(np.int64)
            confusion += np.bincount(truth.ravel() * num_classes + mask.ravel(),
                                     minlength=num_classes**2).reshape(num_classes, num_classes)
    _fail_if(problems)
    if not confusion.any():
        raise CheckFailed(f"{ground_truth} holds no ground truth for the images in {images}")
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    miou = float(np.mean(np.diag(confusion)[union > 0] / union[union > 0]))
    if not miou > min_miou:
        raise CheckFailed(f"{masks}: mIoU {miou:.4f} on the toy scenes is not above {min_miou}")
    return f"{len(inputs)} masks in {masks}: image sizes, class ids 0..{num_classes - 1}, toy-scene mIoU {miou:.4f}"


SHARED_FILES = ("README.md", "config.json", "model.safetensors")


def check_shared(folder: Path, checkpoint: Path, images: Path) -> str:
    """The README's "Share a model" folder: exactly the card, the safetensors weights and a README with Hub
    metadata; Segmenter.from_pretrained loads it and predicts what the checkpoint predicts, mask for mask."""
    from seg import Segmenter

    if not folder.is_dir():
        raise CheckFailed(f"{folder} is missing: seg.export --format hf wrote no folder there")
    problems = []
    found = sorted(p.name for p in folder.iterdir())
    if found != sorted(SHARED_FILES):
        problems.append(f"{folder} holds {found}, expected exactly {sorted(SHARED_FILES)}")
    readme = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    for line in ("library_name: seg", "pipeline_tag: image-segmentation"):
        if line not in readme.split("---")[1 if readme.startswith("---") else 0]:
            problems.append(f"{folder / 'README.md'}: the YAML metadata lacks '{line}'")
    _fail_if(problems)
    shared = Segmenter.from_pretrained(folder, device="cpu", precision="fp32")
    original = Segmenter.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    inputs = sorted(p for p in images.iterdir() if p.is_file())
    for path in inputs:
        if not np.array_equal(shared.predict(path), original.predict(path)):
            problems.append(f"{path}: the shared folder predicts another mask than {checkpoint}")
    _fail_if(problems)
    return f"shared folder {folder}: {', '.join(SHARED_FILES)}; {len(inputs)} masks equal to the checkpoint's"


SERVICE_URL = "http://127.0.0.1:8000"  # the README's serve line runs seg.serve's default host and port
BF16_AGREEMENT = 0.999


def _http(method: str, url: str, body: bytes = None, timeout: float = 120):
    """(status, headers, body) of one request, HTTP errors included (urllib raises them)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def check_served(command: str, checkpoint: Path, images: Path) -> str:
    """The README's serve line, run as a user would (in its own session, so SIGTERM reaches the service and
    not this script): it becomes ready, predicts the masks Segmenter predicts for each image (in fp32 exactly; in
    bf16 on 99.9 % of the pixels), serves the page and the card, refuses a non-image with one-line JSON, and exits
    after SIGTERM."""
    import io
    import os
    import signal
    import subprocess
    import time
    import urllib.error

    from seg import Segmenter

    service = subprocess.Popen(["bash", "-c", command], start_new_session=True)
    problems: List[str] = []
    try:
        deadline = time.monotonic() + 600  # the line installs the serve extra first
        while True:
            if service.poll() is not None:
                raise CheckFailed(f"the serve line exited with status {service.returncode} before it was ready")
            try:
                if _http("GET", SERVICE_URL + "/readyz", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise CheckFailed(f"{SERVICE_URL}/readyz did not answer 200 within 600 s")
            time.sleep(0.5)
        status, _, card = _http("GET", SERVICE_URL + "/v1/model")
        description = json.loads(card) if status == 200 else {}
        precision = description.get("serving", {}).get("precision", "fp32")
        reference = Segmenter.from_checkpoint(checkpoint, precision=precision)  # the service's device and precision
        if status != 200 or description.get("classes") != list(reference.classes):
            problems.append(f"GET /v1/model: status {status}, or not the checkpoint's classes")
        # fp32 masks are the same sums in both processes; bf16 convolutions pick their padding path by timing
        # (seg.models.conv), so two processes may round a near-tie differently: bf16 must agree on 99.9 %.
        least = 1.0 if precision == "fp32" else BF16_AGREEMENT
        agreements = []
        inputs = sorted(p for p in images.iterdir() if p.is_file())
        for path in inputs:
            status, headers, body = _http("POST", SERVICE_URL + "/v1/predict", path.read_bytes())
            if status != 200 or headers.get("content-type") != "image/png":
                problems.append(f"POST {path.name}: status {status}, {headers.get('content-type')}: {body[:200]!r}")
                continue
            served, expected = np.asarray(Image.open(io.BytesIO(body))), reference.predict(path)
            agreements.append(float((served == expected).mean()) if served.shape == expected.shape else 0.0)
            if agreements[-1] < least:
                problems.append(f"POST {path.name}: the service's mask agrees with Segmenter.predict's ({precision}) "
                                f"on {agreements[-1]:.4%} of the pixels, expected at least {least:.1%}")
        status, _, page = _http("GET", SERVICE_URL + "/")
        if status != 200 or b'id="legend"' not in page:
            problems.append(f"GET /: status {status}, or the page has no legend")
        status, _, refusal = _http("POST", SERVICE_URL + "/v1/predict", b"not an image")
        if status != 415 or list(json.loads(refusal)) != ["error"]:
            problems.append(f"POST of a non-image: status {status} {refusal[:200]!r}, expected 415 and one error")
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            problems.append("the serve line did not exit within 120 s of SIGTERM")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # bash has exited; the service drains, then exits
        try:
            os.killpg(service.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.killpg(service.pid, signal.SIGKILL)
        problems.append("the service was still running 60 s after SIGTERM")
    _fail_if(problems)
    return (f"the serve line: ready; {len(inputs)} masks ({precision}) agree with Segmenter's on at least "
            f"{min(agreements, default=0.0):.4%} of the pixels; page, card, 415, SIGTERM")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="check_outputs.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    training = commands.add_parser("training", help="the run folder of the quick start")
    training.add_argument("run", type=Path)
    evaluation = commands.add_parser("eval", help="the JSON written by python -m seg.eval")
    evaluation.add_argument("json", type=Path)
    evaluation.add_argument("--checkpoint", type=Path, required=True)
    evaluation.add_argument("--min-miou", type=float, required=True)
    images = commands.add_parser("images", help="write images to predict on")
    images.add_argument("images", type=Path)
    images.add_argument("--ground-truth", type=Path, required=True)
    images.add_argument("--samples", type=Path, required=True, help="../shared/data, used when present")
    masks = commands.add_parser("masks", help="the masks written by python -m seg.predict")
    masks.add_argument("images", type=Path)
    masks.add_argument("masks", type=Path)
    masks.add_argument("--checkpoint", type=Path, required=True)
    masks.add_argument("--ground-truth", type=Path, required=True)
    masks.add_argument("--min-miou", type=float, required=True)
    shared = commands.add_parser("shared", help="the folder written by python -m seg.export --format hf")
    shared.add_argument("folder", type=Path)
    shared.add_argument("--checkpoint", type=Path, required=True)
    shared.add_argument("--images", type=Path, required=True)
    served = commands.add_parser("served", help="the README's serve line, started and stopped here")
    served.add_argument("--command", dest="command_line", required=True)
    served.add_argument("--checkpoint", type=Path, required=True)
    served.add_argument("--images", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "training":
            summary = check_training(args.run)
        elif args.command == "eval":
            summary = check_eval(args.json, args.checkpoint, args.min_miou)
        elif args.command == "images":
            summary = write_images(args.images, args.ground_truth, args.samples)
        elif args.command == "shared":
            summary = check_shared(args.folder, args.checkpoint, args.images)
        elif args.command == "served":
            summary = check_served(args.command_line, args.checkpoint, args.images)
        else:
            summary = check_masks(args.images, args.masks, args.checkpoint, args.ground_truth, args.min_miou)
    except (CheckFailed, CheckpointError, OSError, ValueError) as error:
        for line in str(error).splitlines():
            print(f"CI: {line}", file=sys.stderr)
        return 1
    print(f"CI: ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
