"""``python -m seg.export --checkpoint C --format {onnx,torchscript} --out F``: a deployable model file.

The exported model takes a normalised (N, 3, H, W) float32 image batch of any size and returns (N, C, H, W)
logits. After writing it, the file is loaded back and run at a size other than the example's, and the largest
absolute logit difference from eager PyTorch is printed; above 1e-3 the export is reported as failed (exit 1).
ONNX uses PyTorch's dynamo exporter and is checked with onnxruntime (``pip install "seg[export]"``);
TorchScript is a trace (PyTorch deprecates TorchScript: prefer ONNX for new deployments).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from seg.engine.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from seg.cli import ArgumentParser, MAX_CROP_SIZE, checkpoint_problem, int_in_range, output_problem
from seg.models.fusion import fuse_conv_bn

TOLERANCE = 1e-3


def export_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    # One self-contained file (weights inside) rather than a .onnx beside a .onnx.data: models here are < 2 GB.
    torch.onnx.export(model, (example,), str(out), dynamo=True, input_names=["image"], output_names=["logits"],
                      dynamic_shapes={"x": dims}, external_data=False)


def run_onnx(path: Path, image: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": image.numpy()})[0])


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice; the module docstring says it
        traced = torch.jit.trace(model, example)
    traced.save(str(out))


def run_torchscript(path: Path, image: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))(image)


FORMATS = {"onnx": (export_onnx, run_onnx), "torchscript": (export_torchscript, run_torchscript)}


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m seg.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a seg checkpoint")
    p.add_argument("--format", choices=sorted(FORMATS), required=True, help="onnx or torchscript")
    p.add_argument("--out", type=Path, required=True, help="the file to write")
    p.add_argument("--size", type=int_in_range(32, MAX_CROP_SIZE), nargs=2, default=(256, 320), metavar=("H", "W"),
                   help=f"example input size, each side 32 to {MAX_CROP_SIZE} (any size works after export)")
    args = p.parse_args(argv)
    for flag, problem in (("--checkpoint", checkpoint_problem(args.checkpoint)),
                          ("--out", output_problem(args.out, folder=False))):
        if problem:
            p.error(f"{flag} {problem}")
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            print('error: --format onnx needs onnx, onnxscript and onnxruntime: pip install "seg[export]"',
                  file=sys.stderr)
            return 2
    try:
        model = fuse_conv_bn(model_from_checkpoint(load_checkpoint(args.checkpoint)), inplace=True)
    except CheckpointError as error:
        print(f"error: --checkpoint: {error}", file=sys.stderr)
        return 2
    export, run = FORMATS[args.format]
    height, width = args.size
    # A batch of 2: a batch of 1 would be specialised into the exported graph as a constant.
    example = torch.randn(2, 3, height, width)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        export(model, example, args.out)
    except OSError as error:
        print(f"error: --out {args.out}: cannot write ({error.strerror})", file=sys.stderr)
        return 2
    check = torch.randn(1, 3, height + 17, width - 9)
    with torch.no_grad():
        difference = (run(args.out, check) - model(check)).abs().max().item()
    verdict = "ok" if difference <= TOLERANCE else f"FAILED (limit {TOLERANCE})"
    print(f"wrote {args.out} ({args.format}); parity at 1x3x{height + 17}x{width - 9}: max |logit difference| "
          f"{difference:.2e} {verdict}")
    return 0 if difference <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
