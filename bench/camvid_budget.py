"""CamVid accuracy under the same wall-clock training budget: a plain segmentation_models_pytorch pipeline
against seg's recipe, trained one after the other on the same machine. The numbers in bench/RESULTS.md:

    python bench/camvid_budget.py --minutes 15 --threads 2

(a) The reference, as a user would assemble it with segmentation_models_pytorch: ``smp.DeepLabV3(encoder_name=
"tu-resnest26d", encoder_weights=None, classes=11)`` trained from scratch on whole frames resized to 256x192
(bilinear image, nearest mask), random horizontal flip, ImageNet normalisation, batch 8 from a shuffled
DataLoader (2 workers, drop_last) epoch after epoch, cross-entropy (ignore 255), fp32, SGD lr 0.02 momentum 0.9
weight decay 1e-4 on all parameters, poly 0.9 over the wall-clock budget: before each step
``lr = 0.02 * (1 - elapsed / budget) ** 0.9``. It stops before a step that would end past the budget (judged from
the median step time so far; the first step always runs), so it ends within the budget as seg's run does.
Deterministic given ``--seed`` (weights, shuffling, flips); only the number of steps depends on the clock.

(b) seg's recipe: ``python -m seg.train --config <--seg-config> --dataset camvid --data-root <root>
--time-budget <minutes> --output-dir <out>/seg`` (OMP_NUM_THREADS = --threads), whose run, its validations
included, ends within the budget. Its number is its LAST validation record in ``<out>/seg/log.jsonl`` (the end of
its schedule: taking the best of several validations would be selection on the scored split); its wall time is
the subprocess's.

Both are scored on CamVid val (101 frames, 480x360) against the full-resolution label maps with seg's own
dataset and metric code (:func:`seg.data.build_dataset`, :class:`seg.engine.metrics.ConfusionMatrix`). The
reference predicts on the 256x192-resized frame; its logits are upsampled bilinearly to 480x360 before the
argmax. The reference's scoring is outside its budget (seg's validations are inside its own).

Prints a markdown table (iterations x batch, train minutes, val mIoU, pixAcc), per-class IoU side by side and
"seg - reference" in mIoU points, and writes everything to ``<out>/camvid_budget.json``. For quick checks:
``--only reference|seg``, ``--val-limit N`` (also passed to seg.train), ``--train-limit N`` (reference only).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from seg.cli import ArgumentParser, int_in_range  # noqa: E402
from seg.data import IGNORE_INDEX, DataError, build_dataset, eval_transforms  # noqa: E402
from seg.engine.metrics import ConfusionMatrix  # noqa: E402

DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data" / "camvid"
DEFAULT_SEG_CONFIG = Path("experiments") / "camvid_scratch_15min.toml"  # relative to the repository root
DEFAULT_OUT = Path("outputs") / "camvid_budget"
LAYOUT = "train/, trainannot/, val/, valannot/ holding same-named PNGs (SegNet release: 367 train / 101 val)"

# The reference recipe.
ENCODER = "tu-resnest26d"
NUM_CLASSES = 11
SIZE = (256, 192)  # width x height the reference trains and predicts at
BATCH = 8
WORKERS = 2
BASE_LR = 0.02
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
POLY_POWER = 0.9
REFERENCE_NAME = f"smp DeepLabV3 {ENCODER} (scratch), {SIZE[0]}x{SIZE[1]}, SGD {BASE_LR} poly"


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


# --- the reference pipeline ---------------------------------------------------------------------------------


def poly_lr(elapsed: float, budget: float) -> float:
    """The reference's learning rate after ``elapsed`` of ``budget`` seconds."""
    return BASE_LR * max(0.0, 1.0 - elapsed / budget) ** POLY_POWER


def resize_frame(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> the (height, width) of ``size = (width, height)``, bilinear."""
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


class ResizedFlipped(Dataset):
    """Whole CamVid frames resized to ``size`` (bilinear image, nearest mask), flipped horizontally half the time,
    normalised with seg's ImageNet mean/std: ``(image (3, h, w) float32, mask (h, w) int64)``.

    The flip is drawn from torch's generator, which the DataLoader seeds per worker from its own generator, so a
    seeded loader gives the same flips whatever the run."""

    def __init__(self, base, size: Tuple[int, int] = SIZE, limit: Optional[int] = None) -> None:
        self.base = base
        self.size = size
        self.count = len(base) if limit is None else min(limit, len(base))
        self.normalise = eval_transforms()  # no geometry: normalisation into tensors only

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        sample = self.base.load(index)
        image = resize_frame(sample["image"], self.size)
        mask = cv2.resize(sample["mask"], self.size, interpolation=cv2.INTER_NEAREST)
        if torch.rand(()) < 0.5:
            image, mask = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
        out = self.normalise({"image": image, "mask": mask})
        return out["image"], out["mask"]


def seed_worker(worker_id: int) -> None:
    """numpy and random in a DataLoader worker follow the worker's torch seed (itself from the loader's
    generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_reference_model() -> torch.nn.Module:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise UsageError("the reference needs segmentation_models_pytorch (pip install segmentation-models-pytorch, "
                         "or the test extra: pip install -e .[test])") from None
    return smp.DeepLabV3(encoder_name=ENCODER, encoder_weights=None, classes=NUM_CLASSES)


def train_reference(root, minutes: float, threads: Optional[int] = None, seed: int = 0,
                    train_limit: Optional[int] = None, progress: bool = True) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Train the smp reference for ``minutes`` of wall time on CamVid train under ``root``.

    Returns the model (in train mode) and stats: steps, batch, images, epochs, train seconds, seconds per step,
    and per step the loss, the lr and the elapsed seconds that lr was computed from.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    budget = minutes * 60.0
    train = build_dataset("camvid", "train", root=root, transforms=None)
    data = ResizedFlipped(train, SIZE, train_limit)
    if len(data) < BATCH:
        raise UsageError(f"--train-limit {train_limit} leaves fewer images than one batch of {BATCH}")

    torch.manual_seed(seed)
    model = build_reference_model()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True,
                        worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed),
                        persistent_workers=WORKERS > 0)

    from tqdm import tqdm

    losses: List[float] = []
    lrs: List[float] = []
    lr_elapsed: List[float] = []
    durations: List[float] = []
    epochs = 0
    bar = tqdm(desc="reference", unit="it", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    done = False
    while not done:
        epochs += 1
        for images, masks in loader:
            elapsed = time.perf_counter() - start
            if lr_elapsed:
                durations.append(elapsed - lr_elapsed[-1])  # the previous step, its wait for this batch included
            if losses and (elapsed >= budget or elapsed + float(np.median(durations)) > budget):
                done = True
                break
            lr = poly_lr(elapsed, budget)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = criterion(model(images), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise RuntimeError(f"reference loss became {value} at step {len(losses) + 1}")
            losses.append(value)
            lrs.append(lr)
            lr_elapsed.append(elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", left=f"{max(0.0, budget - elapsed) / 60:.1f}min")
        else:
            if time.perf_counter() - start >= budget:
                done = True
    seconds = time.perf_counter() - start
    bar.close()
    head, tail = losses[:10], losses[-10:]
    stats = {
        "pipeline": REFERENCE_NAME,
        "encoder": ENCODER,
        "classes": NUM_CLASSES,
        "size": list(SIZE),
        "steps": len(losses),
        "batch": BATCH,
        "images": len(losses) * BATCH,
        "train_images": len(data),
        "epochs_started": epochs,
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(1, len(losses)),
        "median_step_seconds": float(np.median(np.diff(lr_elapsed + [seconds]))),
        "first_batch_wait_seconds": lr_elapsed[0],
        "budget_seconds": budget,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "loss_first10_mean": float(np.mean(head)),
        "loss_last10_mean": float(np.mean(tail)),
        "loss": losses,
        "lr": lrs,
        "lr_elapsed_s": lr_elapsed,
    }
    return model, stats


# --- scoring ---------------------------------------------------------------------------------------------------


def score(model_fn: Callable[[torch.Tensor], torch.Tensor], dataset, size: Tuple[int, int] = SIZE,
          limit: Optional[int] = None, progress: bool = False) -> Dict[str, Any]:
    """Score ``model_fn`` on ``dataset`` (a seg dataset with ``.load``) at full label resolution.

    Each frame is resized to ``size`` (width, height; bilinear) and normalised as in training; ``model_fn`` maps
    the (1, 3, h, w) tensor to (1, C, h', w') logits, which are upsampled bilinearly to the label map's size
    before the argmax. Returns :meth:`ConfusionMatrix.compute`'s metrics plus ``images`` and ``labelled_pixels``.
    An ``nn.Module`` is put in eval mode first.
    """
    if isinstance(model_fn, torch.nn.Module):
        model_fn.eval()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    normalise = eval_transforms()
    matrix = ConfusionMatrix(dataset.num_classes)
    from tqdm import tqdm

    with torch.no_grad():
        for index in tqdm(range(count), desc="scoring", disable=not progress, leave=False):
            sample = dataset.load(index)
            mask = torch.from_numpy(sample["mask"].astype(np.int64))
            image = normalise({"image": resize_frame(sample["image"], size), "mask": None})["image"][None]
            logits = model_fn(image)
            logits = F.interpolate(logits.float(), size=tuple(mask.shape), mode="bilinear", align_corners=False)
            matrix.update(logits.argmax(1)[0], mask)
    metrics = matrix.compute(dataset.classes)
    metrics["images"] = count
    metrics["labelled_pixels"] = int(matrix.matrix.sum())
    return metrics


# --- seg's recipe ----------------------------------------------------------------------------------------------


def seg_command(config: Path, root: Path, minutes: float, out: Path, val_limit: Optional[int]) -> List[str]:
    command = [sys.executable, "-m", "seg.train", "--config", str(config), "--dataset", "camvid",
               "--data-root", str(root), "--time-budget", f"{minutes:g}", "--output-dir", str(out)]
    if val_limit is not None:
        command += ["--val-limit", str(val_limit)]
    return command


def seg_batch(config: Path, train_images: int) -> Optional[int]:
    """Images per optimizer step of seg's run (one process), from its config as seg.train reads it."""
    try:
        from seg.config import build_config

        cfg = build_config({"dataset": "camvid"}, config)
        per_step = cfg.batch_size or max(1, cfg.total_batch // cfg.accum)
        return int(per_step * cfg.accum)
    except Exception:  # noqa: BLE001 - informative only: the table shows "?" when seg's config API differs
        return None


def read_seg_log(path: Path) -> Dict[str, Any]:
    """The last validation record and the last training record of seg's log.jsonl."""
    if not path.is_file():
        raise RuntimeError(f"seg.train wrote no {path}")
    validation, training = None, None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "mIoU" in record and "per_class_IoU" in record:
            validation = record
        elif "loss" in record:
            training = record
    if validation is None:
        raise RuntimeError(f"{path} holds no validation record (keys mIoU, per_class_IoU)")
    return {"validation": validation, "training": training}


def run_seg(config: Path, root: Path, minutes: float, out: Path, threads: int,
            val_limit: Optional[int]) -> Dict[str, Any]:
    run_dir = out / "seg"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.jsonl"
    if log.exists():
        log.unlink()  # seg.train appends: a previous run's records must not be read as this run's
    command = seg_command(config, root, minutes, run_dir, val_limit)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print("seg:", " ".join(command), f"(OMP_NUM_THREADS={threads})", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"seg.train exited with status {result.returncode} (its output is above)")
    records = read_seg_log(log)
    validation = records["validation"]
    train_images = len(build_dataset("camvid", "train", root=root))
    return {
        "pipeline": f"seg: {display_path(config)}",
        "command": command,
        "env": {"OMP_NUM_THREADS": str(threads)},
        "steps": int(validation["iteration"]),
        "batch": seg_batch(config, train_images),
        "wall_seconds": seconds,
        "mIoU": validation["mIoU"],
        "pixAcc": validation["pixAcc"],
        "per_class_IoU": validation["per_class_IoU"],
        "last_validation": validation,
        "last_training_record": records["training"],
        "log": str(log),
    }


# --- report ----------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def percent(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def report(header: str, rows: Sequence[Dict[str, Any]], classes: Sequence[str]) -> str:
    """The markdown tables: one row per pipeline, per-class IoU side by side, the mIoU difference."""
    lines = [header, "", "| pipeline | iterations x batch | train minutes (wall) | val mIoU | val pixAcc |",
             "|---|---|---|---|---|"]
    for row in rows:
        batch = "?" if row["batch"] is None else row["batch"]
        lines.append(f"| {row['pipeline']} | {row['steps']} x {batch} | {row['minutes']:.2f} | "
                     f"{percent(row['mIoU'])} | {percent(row['pixAcc'])} |")
    lines += ["", "| class | " + " | ".join(f"{row['name']} IoU" for row in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(percent(row["per_class_IoU"].get(name)) for row in rows) + " |")
    lines += ["", "mIoU, pixAcc and IoU in percent (n/a: class absent from the scored images and never predicted). "
              "Train minutes: the reference's training loop (its scoring after it, outside the budget); seg's "
              "whole seg.train process, its validations included."]
    by_name = {row["name"]: row for row in rows}
    if "seg" in by_name and "reference" in by_name:
        seg, ref = by_name["seg"]["mIoU"], by_name["reference"]["mIoU"]
        lines += ["", f"seg - reference: {100 * (seg - ref):+.2f} mIoU points"]
    return "\n".join(lines)


def finite(value: Any) -> Any:
    """NaN/inf -> None throughout, so the JSON file is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def check_data_root(root: Path) -> None:
    missing = [name for name in ("train", "trainannot", "val", "valannot") if not (root / name).is_dir()]
    if not root.is_dir():
        raise UsageError(f"--data-root {root} does not exist; expected the CamVid folder with {LAYOUT}")
    if missing:
        raise UsageError(f"--data-root {root} lacks {', '.join(m + '/' for m in missing)}; expected {LAYOUT}")


def parse_args(argv=None):
    p = ArgumentParser(prog="python bench/camvid_budget.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget of each (default 15)")
    p.add_argument("--threads", type=int_in_range(1), default=None,
                   help="torch threads for the reference, OMP_NUM_THREADS for seg (default: torch's current)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                   help=f"CamVid folder ({LAYOUT}); default ../shared/data/camvid beside the repository")
    p.add_argument("--seg-config", type=Path, default=None,
                   help=f"seg.train --config (default {DEFAULT_SEG_CONFIG} in the repository)")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT} in the repository)")
    p.add_argument("--only", choices=["reference", "seg", "both"], default="both", help="run one side only")
    p.add_argument("--val-limit", type=int_in_range(1), default=None,
                   help="score the first N val images only (also seg.train --val-limit)")
    p.add_argument("--train-limit", type=int_in_range(1), default=None,
                   help="reference: train on the first N train images only")
    p.add_argument("--seed", type=int, default=0, help="the reference's seed (default 0)")
    args = p.parse_args(argv)
    if not (args.minutes > 0 and math.isfinite(args.minutes)):
        p.error(f"--minutes must be a positive number, got {args.minutes}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    root = args.data_root
    out = args.out if args.out is not None else REPO / DEFAULT_OUT
    config = args.seg_config if args.seg_config is not None else REPO / DEFAULT_SEG_CONFIG
    config = config.resolve()
    run_reference, run_seg_side = args.only in ("reference", "both"), args.only in ("seg", "both")
    try:
        if run_seg_side and not config.is_file():
            raise UsageError(f"seg config {config} does not exist (--seg-config)")
        check_data_root(root)
        root = root.resolve()
        try:
            val = build_dataset("camvid", "val", root=root, transforms=None)
        except DataError as error:
            raise UsageError(str(error)) from None
        out.mkdir(parents=True, exist_ok=True)
        cpu = cpu_name()
        header = (f"CamVid, {args.minutes:g} min training budget each, val {min(args.val_limit or len(val), len(val))}"
                  f" images at full resolution; CPU: {cpu}; torch {torch.__version__}; {threads} threads")
        print(header, flush=True)
        rows, results = [], {}
        if run_reference:
            try:
                model, stats = train_reference(root, args.minutes, threads, args.seed, args.train_limit)
            except DataError as error:
                raise UsageError(str(error)) from None
            print(f"reference: {stats['steps']} steps x {BATCH} in {stats['train_seconds']:.1f} s "
                  f"({stats['seconds_per_step']:.2f} s/step); loss {stats['loss_first10_mean']:.3f} (first 10 "
                  f"steps) -> {stats['loss_last10_mean']:.3f} (last 10); scoring", flush=True)
            metrics = score(model, val, SIZE, args.val_limit, progress=True)
            per_class = {name: values["IoU"] for name, values in metrics["per_class"].items()}
            results["reference"] = {**stats, "mIoU": metrics["mIoU"], "pixAcc": metrics["pixAcc"],
                                    "per_class_IoU": per_class, "metrics": metrics,
                                    "command": [sys.executable, *sys.argv] if argv is None else ["main", *argv]}
            rows.append({"name": "reference", "pipeline": REFERENCE_NAME, "steps": stats["steps"], "batch": BATCH,
                         "minutes": stats["train_seconds"] / 60, "mIoU": metrics["mIoU"],
                         "pixAcc": metrics["pixAcc"], "per_class_IoU": per_class})
            del model
        if run_seg_side:
            seg = run_seg(config, root, args.minutes, out, threads, args.val_limit)
            results["seg"] = seg
            rows.append({"name": "seg", "pipeline": seg["pipeline"], "steps": seg["steps"], "batch": seg["batch"],
                         "minutes": seg["wall_seconds"] / 60, "mIoU": seg["mIoU"], "pixAcc": seg["pixAcc"],
                         "per_class_IoU": seg["per_class_IoU"]})
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    table = report(header, rows, val.classes)
    print("\n" + table)
    summary = {
        "budget_minutes": args.minutes,
        "threads": threads,
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "data_root": str(root),
        "val_images": min(args.val_limit or len(val), len(val)),
        "seg_config": str(config),
        "only": args.only,
        "results": results,
        "table": table,
    }
    if "seg" in results and "reference" in results:
        summary["seg_minus_reference_mIoU_points"] = 100 * (results["seg"]["mIoU"] - results["reference"]["mIoU"])
    path = out / "camvid_budget.json"
    path.write_text(json.dumps(finite(summary), indent=1, allow_nan=False) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
