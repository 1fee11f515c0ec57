"""``python -m seg.export --checkpoint C --format {onnx,torchscript,hf} --out F``: a deployable model file, or a
model folder to share.

``--format hf`` writes the folder ``Segmenter.save_pretrained`` writes (``config.json``: the model card,
``model.safetensors``, ``README.md`` with Hub metadata), to upload to the Hugging Face Hub or load with
``Segmenter.from_pretrained(DIR)``; ``--metrics eval.json`` adds the numbers a ``seg.eval`` run measured (its
``--json`` file) to the card, ``--license`` sets the weights' licence.

For onnx and torchscript, the exported model takes a normalised (N, 3, H, W) float32 image batch of any size and returns (N, C, H, W)
logits. After writing it, the file is loaded back and run at a size other than the example's, and the largest
absolute logit difference from eager PyTorch is printed; above 1e-3 the export is reported as failed (exit 1).
ONNX uses PyTorch's dynamo exporter and is checked with onnxruntime (``pip install "seg[export]"``);
TorchScript is a trace (PyTorch deprecates TorchScript: prefer ONNX for new deployments).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from seg.card import CardMetrics, ModelCard, ModelCardError
from seg.cli import ArgumentParser, MAX_CROP_SIZE, checkpoint_problem, int_in_range, output_problem
from seg.engine.checkpoint import CheckpointError, model_from_card
from seg.hub import HubError, read_model, save_folder
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
SHARED_FORMAT = "hf"


def metrics_of_evaluation(path: Path) -> CardMetrics:
    """The card metrics of a ``seg.eval --json`` file; ValueError naming the file when it is not one."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return CardMetrics(dataset=record["dataset"], split=record["split"], mIoU=float(record["mIoU"]),
                           pixAcc=float(record["pixAcc"]), inference=record["inference"]["setting"],
                           precision=record["inference"]["precision"])
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror})") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a seg.eval --json file ({type(error).__name__}: {error})") from None


def export_shared_folder(card: ModelCard, weights, out: Path, metrics: Path = None, license: str = None) -> str:
    """Write the shared folder (module docstring); returns the line to print."""
    if metrics is not None:
        measured = metrics_of_evaluation(metrics)
        if measured.dataset != card.dataset:
            raise ValueError(f"{metrics} measures {measured.dataset}, but the model was trained on {card.dataset}")
        card = card.with_metrics(measured)
    if license is not None:
        card = card.replace(license=license)
    model_from_card(card, weights, str(out))  # the folder must load: the weights fit the card
    save_folder(out, card, weights)
    return f"wrote {out}/ (config.json, model.safetensors, README.md); load it with Segmenter.from_pretrained"


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m seg.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a seg checkpoint or shared model folder")
    p.add_argument("--format", choices=sorted(FORMATS) + [SHARED_FORMAT], required=True,
                   help="onnx, torchscript, or hf (a folder for the Hugging Face Hub)")
    p.add_argument("--out", type=Path, required=True, help="the file to write (with hf: the folder)")
    p.add_argument("--size", type=int_in_range(32, MAX_CROP_SIZE), nargs=2, default=(256, 320), metavar=("H", "W"),
                   help=f"example input size, each side 32 to {MAX_CROP_SIZE} (any size works after export)")
    p.add_argument("--metrics", type=Path, help="with hf: a seg.eval --json file whose numbers go into the card")
    p.add_argument("--license", help="with hf: the weights' licence, an SPDX id such as apache-2.0 (default: the "
                   "card's)")
    args = p.parse_args(argv)
    shared = args.format == SHARED_FORMAT
    for flag, problem in (("--checkpoint", checkpoint_problem(args.checkpoint)),
                          ("--out", output_problem(args.out, folder=shared))):
        if problem:
            p.error(f"{flag} {problem}")
    if not shared and (args.metrics is not None or args.license is not None):
        p.error("--metrics and --license describe a shared folder: use them with --format hf")
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            print('error: --format onnx needs onnx, onnxscript and onnxruntime: pip install "seg[export]"',
                  file=sys.stderr)
            return 2
    try:
        card, weights = read_model(args.checkpoint)
        if shared:
            print(export_shared_folder(card, weights, args.out, args.metrics, args.license))
            return 0
        model = fuse_conv_bn(model_from_card(card, weights, str(args.checkpoint)), inplace=True)
    except (CheckpointError, HubError, ModelCardError) as error:
        print(f"error: --checkpoint: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: --metrics: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: --out {args.out}: cannot write ({error.strerror})", file=sys.stderr)
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
