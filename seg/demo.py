"""``python -m seg.demo``: build DeepLabV3 on a ResNeSt backbone and segment a built-in synthetic image.

A smoke run of the whole model path on any machine, with no data and no network: it prints the model's size
and cost and the forward latency, and writes the input and the predicted mask as PNGs. Without
``--pretrained-backbone`` the weights are random, so the mask shows the pipeline working, not accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seg.data.toy import toy_scene
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from seg.models import PretrainedWeightsError, build_segmentor, list_backbones
from seg.models.complexity import count_macs, count_parameters


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours from a fixed palette."""
    palette = np.random.default_rng(1).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)
    return palette[mask]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m seg.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnest50", help="registered backbone (default: resnest50)")
    parser.add_argument("--num-classes", type=int, default=150, help="output classes (default: 150, ADE20K)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"), help="image size")
    parser.add_argument("--pretrained-backbone", default=None, help="published name or weights file")
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"), help="where the PNGs go")
    args = parser.parse_args(argv)
    if args.backbone not in list_backbones():
        parser.error(f"--backbone {args.backbone!r} is unknown; choose one of: {', '.join(list_backbones())}")
    if args.num_classes < 1:
        parser.error(f"--num-classes must be positive, got {args.num_classes}")
    if min(args.size) < 32:
        parser.error(f"--size must be at least 32 x 32, got {args.size[0]} x {args.size[1]}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    height, width = args.size
    try:
        model = build_segmentor(
            "deeplabv3",
            backbone=args.backbone,
            num_classes=args.num_classes,
            pretrained_backbone=args.pretrained_backbone,
        ).eval()
    except PretrainedWeightsError as error:
        print(f"error: --pretrained-backbone: {error}", file=sys.stderr)
        return 2

    image, _ = toy_scene(height, width, seed=0)
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    normalised = (image.astype(np.float32) / 255.0 - mean) / std
    x = torch.from_numpy(normalised).permute(2, 0, 1)[None]
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(x)
        latency = time.perf_counter() - start
    mask = logits.argmax(1)[0].numpy()

    macs = count_macs(
        lambda: build_segmentor("deeplabv3", backbone=args.backbone, num_classes=args.num_classes), (height, width)
    )
    print(f"DeepLabV3-{args.backbone}: {count_parameters(model) / 1e6:.2f}M parameters, "
          f"{macs / 1e9:.1f} GMACs at {height}x{width}, output stride 8")
    print(f"forward: {latency * 1000:.0f} ms on {torch.get_num_threads()} CPU threads; "
          f"logits {tuple(logits.shape)}, {len(np.unique(mask))} classes in the mask")
    if args.pretrained_backbone is None:
        print("weights are random (no --pretrained-backbone): the mask shows the pipeline, not accuracy")

    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(args.output_dir / "input.png")
        Image.fromarray(colorize(mask, args.num_classes)).save(args.output_dir / "prediction.png")
    except OSError as error:
        print(f"error: --output-dir {args.output_dir}: cannot write ({error.strerror})", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir / 'input.png'} and {args.output_dir / 'prediction.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
