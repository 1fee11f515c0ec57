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
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image

from seg.card import ModelCard, ModelCardError
from seg.config import RECIPES, ConfigError, TrainConfig
from seg.data import DataError, build_dataset, eval_transforms, list_datasets
from seg.cli import (ArgumentParser, MAX_CROP_SIZE, checkpoint_problem, crop_size_type, flag_message, int_in_range,
                     output_problem, parse_scales)
from seg.engine.checkpoint import CheckpointError, checkpoint_card, load_checkpoint, model_from_card
from seg.engine.distributed import init_distributed, shutdown_distributed
from seg.engine.evaluator import evaluate
from seg.engine.inference import (InferenceOptions, describe_inference, inference_model, resolve_inference,
                                  test_scales_for)
from seg.engine.metrics import format_metrics_table
from seg.engine.precision import PRECISIONS, precision_name, resolve_precision
from seg.engine.plots import overlay, save_confusion_matrix, save_per_class_iou, save_prediction_panels
from seg.hub import HubError, read_model
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
    add("--checkpoint", type=Path, help="a seg checkpoint, a shared model folder or Hub repo id (owner/name), or a "
        "PyTorch-Encoding DeepLab file with --backbone (default: best.pth of the most recent run under outputs/)")
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
    add("--base-size", type=int_in_range(0), help="long side that the scales multiply, also for single-scale "
        "evaluation (default: the training base size, the scale the model was trained at; 0: each image's own "
        "size; metrics are always at the labels' resolution)")
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


def foreign_card(backbone: str, dataset) -> ModelCard:
    """The card of a published DeepLabV3 state-dict file (PyTorch-Encoding's): the architecture from
    ``--backbone``, the sizes from the dataset's training recipe, the rest from the dataset."""
    recipe = RECIPES.get(dataset.name, {})
    return ModelCard.for_dataset(dataset, segmentor="deeplabv3", backbone=backbone, output_stride=8, aux=True,
                                 crop_size=recipe.get("crop_size", TrainConfig.crop_size),
                                 base_size=recipe.get("base_size", TrainConfig.base_size),
                                 test_scales=test_scales_for(dataset.name))


def load_model(card: ModelCard, weights: Optional[dict], source: Path) -> torch.nn.Module:
    """The network of ``card`` with ``weights``; without them (a state-dict file with --backbone), the weights
    are read from ``source`` in whichever published layout it has."""
    if weights is not None:
        return model_from_card(card, weights, str(source))
    return build_segmentor(**card.builder_arguments(), pretrained=str(source)).eval()


def inference_options(args) -> InferenceOptions:
    """The flags as inference options: each flag is the option of the same name (``--batch-size``:
    ``window_batch``), resolved against the card like ``Segmenter``'s keyword arguments."""
    return InferenceOptions(ms_flip=args.ms_flip, scales=args.scales, flip=args.flip, mode=args.mode,
                            crop_size=args.crop_size, stride=args.stride, base_size=args.base_size,
                            window_batch=args.batch_size)


def read_trained(args) -> Tuple[Optional[ModelCard], Optional[dict], dict]:
    """(card, weights, training config) of --checkpoint; (None, None, {}) for a foreign state-dict file with
    --backbone."""
    if not args.checkpoint.is_file():
        card, weights = read_model(args.checkpoint)  # a shared folder or Hub repo id
        return card, weights, {}
    try:
        payload = load_checkpoint(args.checkpoint)
    except CheckpointError:
        if args.backbone is None:
            raise  # without --backbone it can only be a seg checkpoint
        return None, None, {}
    return checkpoint_card(payload, args.checkpoint), payload["model"], payload.get("config", {})


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
    except ConfigError as error:  # an inference option: worded with this command's flag
        print(f"error: {flag_message(error, {'window_batch': '--batch-size'})}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, HubError, ModelCardError, PretrainedWeightsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output that became unwritable after the checks above
        print(f"error: cannot write {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()


def run(args) -> int:
    context = init_distributed(args.device)
    card, weights, trained = read_trained(args)
    dataset_name = args.dataset or (card.dataset if card is not None else None)
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
    if card is None:
        card = foreign_card(args.backbone, dataset)
    # Checked before the model is built: a checkpoint of another dataset fails at once.
    if card.num_classes != dataset.num_classes:
        raise ValueError(f"{args.checkpoint} predicts {card.num_classes} classes but {dataset_name} has "
                         f"{dataset.num_classes}; pass the --dataset it was trained on")
    # Batch norm folded into the convolutions, channels_last, in the chosen precision: the same outputs in fp32
    # (tests/models/test_fusion.py), faster (bench/RESULTS.md).
    dtype = resolve_precision(args.precision, context.device)
    model = inference_model(load_model(card, weights, args.checkpoint), context.device, dtype, inplace=True)
    inference = resolve_inference(card, inference_options(args))
    if context.is_main:
        print(f"evaluating {args.checkpoint} on {dataset_name} {args.split} ({len(dataset)} images), mode "
              f"{inference.mode}, scales {list(inference.scales)}, flip {inference.flip}"
              + (f", base size {inference.base_size}" if inference.base_size else ", each image at its own size")
              + f", {precision_name(dtype)}", flush=True)

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
              "images": len(dataset), "inference": {"setting": describe_inference(inference),
                                                    "mode": inference.mode, "scales": list(inference.scales),
                                                    "flip": inference.flip, "crop_size": inference.crop_size,
                                                    "base_size": inference.base_size,
                                                    "precision": precision_name(dtype)}}
    json_path.write_text(json.dumps(record, indent=2, allow_nan=True))
    confusion_png = json_path.with_name(json_path.stem + "_confusion.png")
    save_confusion_matrix(matrix, dataset.classes, confusion_png)
    per_class_png = json_path.with_name(json_path.stem + "_per_class_iou.png")
    save_per_class_iou({name: values["IoU"] for name, values in metrics["per_class"].items()}, per_class_png,
                       title=f"{dataset_name} {args.split}, {describe_inference(inference)}, {precision_name(dtype)}")
    print(f"wrote {json_path}, {confusion_png} and {per_class_png}"
          + (f"; predictions in {args.save_pred}" if args.save_pred else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
