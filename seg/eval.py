"""``python -m seg.eval``: pixAcc, mIoU and per-class numbers of a checkpoint, as the benchmarks define them.

    python -m seg.eval --ms-flip                                   # best checkpoint of the latest run, its val split
    python -m seg.eval --checkpoint outputs/ade20k_resnest101/best.pth --ms-flip --json results.json
    python -m seg.eval --checkpoint deeplab_resnest50_ade-2225f09d.pth --backbone resnest50 --dataset ade20k
    torchrun --nproc_per_node=8 -m seg.eval --checkpoint best.pth --ms-flip      # each image counted once

Prints a per-class table, writes the metrics as JSON and the confusion matrix as a PNG (beside the checkpoint
unless --json says where), and with --save-pred one PNG per image in the dataset's own label values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from seg.config import RECIPES
from seg.data import DataError, build_dataset, eval_transforms, list_datasets
from seg.cli import (ArgumentParser, MAX_CROP_SIZE, checkpoint_problem, crop_size_type, int_in_range,
                     output_problem, parse_scales)
from seg.engine.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from seg.engine.distributed import init_distributed, shutdown_distributed
from seg.engine.evaluator import evaluate
from seg.engine.inference import MS_SCALES, InferenceConfig, inference_model
from seg.engine.metrics import format_metrics_table
from seg.engine.precision import PRECISIONS, precision_name, resolve_precision
from seg.engine.plots import overlay, save_confusion_matrix, save_per_class_iou, save_prediction_panels
from seg.models import PretrainedWeightsError, build_segmentor, list_backbones

def latest_checkpoint(root: Path = Path("outputs")) -> Optional[Path]:
    """The most recently written best.pth (else last.pth) under the default output directory."""
    candidates = sorted(root.glob("*/best.pth"), key=lambda p: p.stat().st_mtime) or sorted(
        root.glob("*/last.pth"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None




def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m seg.eval", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--checkpoint", type=Path, help="a seg checkpoint, or a PyTorch-Encoding DeepLab file with --backbone "
        "(default: best.pth of the most recent run under outputs/)")
    add("--backbone", help="backbone of a non-seg checkpoint")
    add("--dataset", help=f"one of {', '.join(list_datasets())} (default: the checkpoint's)")
    add("--data-root", help="the dataset's folder (default: the checkpoint's, else $SEG_DATA_ROOT/<dataset>)")
    add("--split", default="val", help="train, val or test (default val)")
    add("--ms-flip", action="store_true", help="the dataset's multi-scale + flip evaluation (slide at each scale)")
    add("--scales", type=parse_scales, help="comma-separated scales, e.g. 0.5,0.75,1.0")
    add("--flip", action="store_true", help="add the horizontally flipped view")
    add("--mode", choices=["whole", "slide"], help="whole image or sliding windows (default whole; slide w/ --ms-flip)")
    add("--crop-size", type=crop_size_type,
        help=f"window side for slide, 1 to {MAX_CROP_SIZE} (default: the training crop)")
    add("--stride", type=int_in_range(1), help="window step for slide, 1 to the crop size (default 2/3 crop)")
    add("--base-size", type=int_in_range(1), help="long side that the scales multiply, also for single-scale "
        "evaluation (default: the training base size, the scale the model was trained at; metrics are always at "
        "the labels' resolution)")
    add("--batch-size", type=int_in_range(1), default=4, help="windows per forward pass in slide mode")
    add("--precision", choices=PRECISIONS, default="fp32", help="what the model computes in: fp32 (default, the "
        "benchmarks' numbers), bf16, fp16, or auto (bf16 on CPUs with AMX / AVX-512 BF16 and bf16 GPUs); softmax, "
        "averaging and argmax stay fp32")
    add("--amp", dest="precision", choices=PRECISIONS, type=lambda value: "fp32" if value == "off" else value,
        help="the same as --precision (off: fp32)")
    add("--limit", type=int_in_range(1), help="evaluate the first N images only")
    add("--save-pred", type=Path, help="write one PNG per image here, in the dataset's own label values")
    add("--save-overlay", action="store_true", help="with --save-pred, also write colour overlays and image | "
        "ground truth | prediction panels with a class legend")
    add("--json", type=Path, help="where the metrics JSON goes (the confusion PNG goes beside it)")
    add("--workers", type=int_in_range(0), default=2, help="DataLoader workers")
    add("--device", default="auto", help="auto (default), cpu or cuda")
    return p


def load_model(args, payload: Optional[dict], num_classes: int) -> torch.nn.Module:
    """The model of a seg checkpoint ``payload``, else (None) of a state-dict file with --backbone."""
    if payload is not None:
        return model_from_checkpoint(payload)
    # A published PyTorch-Encoding (or other state-dict) file: the architecture comes from the flags.
    model = build_segmentor("deeplabv3", backbone=args.backbone, num_classes=num_classes,
                            pretrained=str(args.checkpoint))
    return model.eval()


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.dataset is not None and args.dataset not in list_datasets():
        p.error(f"--dataset {args.dataset!r} is unknown; choose one of: {', '.join(list_datasets())}")
    if args.backbone is not None and args.backbone not in list_backbones():
        p.error(f"--backbone {args.backbone!r} is unknown; choose one of: {', '.join(list_backbones())}")
    if args.checkpoint is None:
        args.checkpoint = latest_checkpoint()
        if args.checkpoint is None:
            p.error("no --checkpoint given and no run found under outputs/ (train one with python -m seg.train)")
    problems = [("--checkpoint", checkpoint_problem(args.checkpoint))]
    if args.save_pred is not None:
        problems.append(("--save-pred", output_problem(args.save_pred, folder=True)))
    if args.json is not None:
        problems.append(("--json", output_problem(args.json, folder=False)))
    for flag, problem in problems:
        if problem:
            p.error(f"{flag} {problem}")
    try:
        return run(args)
    except (CheckpointError, DataError, PretrainedWeightsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output that became unwritable after the checks above
        print(f"error: cannot write {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()


def run(args) -> int:
    context = init_distributed(args.device)
    payload = None
    if args.checkpoint.is_file() or args.backbone is None:
        try:
            payload = load_checkpoint(args.checkpoint)
        except CheckpointError:
            if args.backbone is None:
                raise  # without --backbone it can only be a seg checkpoint
    trained = payload.get("config", {}) if payload is not None else {}
    dataset_name = args.dataset or trained.get("dataset")
    if dataset_name is None:
        raise ValueError(f"--dataset is needed: {args.checkpoint} does not name its dataset")
    if dataset_name not in list_datasets():
        raise ValueError(f"{args.checkpoint} was trained on {dataset_name!r}, which is not a dataset here; pass "
                         f"--dataset (one of: {', '.join(list_datasets())})")
    root = args.data_root or (trained.get("data_root") if dataset_name == trained.get("dataset") else None)
    dataset = build_dataset(dataset_name, args.split, root=root, transforms=eval_transforms())
    if args.limit:
        dataset.samples = dataset.samples[: args.limit]
    if len(dataset) == 0:
        raise DataError(f"{dataset_name} {args.split} split has no samples" + (f" under {root}" if root else ""))
    # Checked before the model is built: a checkpoint of another dataset fails at once.
    if payload is not None and payload["model_config"]["num_classes"] != dataset.num_classes:
        raise ValueError(f"{args.checkpoint} predicts {payload['model_config']['num_classes']} classes but "
                         f"{dataset_name} has {dataset.num_classes}; pass the --dataset it was trained on")
    # Batch norm folded into the convolutions, channels_last, in the chosen precision: the same outputs in fp32
    # (tests/models/test_fusion.py), faster (bench/RESULTS.md).
    dtype = resolve_precision(args.precision, context.device)
    model = inference_model(load_model(args, payload, dataset.num_classes), context.device, dtype,
                            inplace=True)

    recipe = RECIPES.get(dataset_name, {})
    crop = args.crop_size or trained.get("crop_size") or recipe.get("crop_size", 512)
    base = args.base_size or trained.get("base_size") or recipe.get("base_size")
    scales = args.scales or (MS_SCALES.get(dataset_name, (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)) if args.ms_flip
                             else (1.0,))
    inference = InferenceConfig(
        mode=args.mode or ("slide" if args.ms_flip else "whole"), crop_size=crop, stride=args.stride,
        scales=scales, flip=args.flip or args.ms_flip, base_size=base,
        window_batch=args.batch_size,
    )
    if context.is_main:
        print(f"evaluating {args.checkpoint} on {dataset_name} {args.split} ({len(dataset)} images), mode "
              f"{inference.mode}, scales {list(inference.scales)}, flip {inference.flip}"
              + (f", base size {base}" if inference.base_size else "") + f", {precision_name(dtype)}", flush=True)

    def save_prediction(index: int, prediction: torch.Tensor) -> None:
        sample = dataset.samples[index]
        mask = prediction.cpu().numpy().astype(np.uint8)
        args.save_pred.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.to_stored_ids(mask)).save(args.save_pred / f"{Path(sample.image).stem}.png")
        if args.save_overlay:
            loaded = dataset.load(index)
            stem = Path(sample.image).stem
            overlay(loaded["image"], mask, dataset.palette).save(args.save_pred / f"{stem}_overlay.png")
            save_prediction_panels(loaded["image"], mask, dataset.palette, dataset.classes,
                                   args.save_pred / f"{stem}_panels.png", ground_truth=loaded["mask"],
                                   title=Path(sample.image).name)

    metrics = evaluate(model, dataset, context.device, inference, workers=args.workers, progress=context.is_main,
                       on_prediction=save_prediction if args.save_pred else None)
    if not context.is_main:
        return 0
    print(format_metrics_table(metrics))
    json_path = args.json or args.checkpoint.parent / f"eval_{dataset_name}_{args.split}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    matrix = metrics.pop("confusion_matrix")
    record = {**metrics, "checkpoint": str(args.checkpoint), "dataset": dataset_name, "split": args.split,
              "images": len(dataset), "inference": {"mode": inference.mode, "scales": list(inference.scales),
                                                    "flip": inference.flip, "crop_size": inference.crop_size,
                                                    "base_size": inference.base_size,
                                                    "precision": precision_name(dtype)}}
    json_path.write_text(json.dumps(record, indent=2, allow_nan=True))
    confusion_png = json_path.with_name(json_path.stem + "_confusion.png")
    save_confusion_matrix(matrix, dataset.classes, confusion_png)
    per_class_png = json_path.with_name(json_path.stem + "_per_class_iou.png")
    mode = "multi-scale + flip" if len(inference.scales) > 1 and inference.flip else "single scale"
    save_per_class_iou({name: values["IoU"] for name, values in metrics["per_class"].items()}, per_class_png,
                       title=f"{dataset_name} {args.split}, {mode}, {precision_name(dtype)}")
    print(f"wrote {json_path}, {confusion_png} and {per_class_png}"
          + (f"; predictions in {args.save_pred}" if args.save_pred else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
