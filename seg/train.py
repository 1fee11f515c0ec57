"""``python -m seg.train``: train DeepLabV3 with the paper's recipe (one process, or many under ``torchrun``).

    python -m seg.train --dataset ade20k --backbone resnest101          # the paper's ADE20K recipe
    torchrun --nproc_per_node=8 -m seg.train --dataset cityscapes        # 8 GPUs, synchronised BN
    python -m seg.train --config experiments/ade20k_deeplabv3_resnest50.toml --iters 1000
    python -m seg.train                                                  # the built-in toy data, a few minutes on CPU

Defaults come from the dataset's recipe (see ``seg.config.RECIPES``), then ``--config``, then these flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict

from seg.cli import ArgumentParser, flag_message
from seg.config import FIELDS, RECIPES, ConfigError, build_config
from seg.data import DataError, list_datasets
from seg.engine.checkpoint import CheckpointError
from seg.engine.distributed import shutdown_distributed
from seg.models import PretrainedWeightsError, list_backbones


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m seg.train", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Dataset recipes: " + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
    add = p.add_argument
    add("--config", type=Path, help="TOML file of settings (flags override it)")
    add("--dataset", help=f"one of {', '.join(list_datasets())} (default: toy)")
    add("--backbone", help="registered backbone (default: the recipe's, resnest101 for ADE20K/Cityscapes)")
    add("--data-root", help="the dataset's folder (default: $SEG_DATA_ROOT/<dataset>, else ./datasets/<dataset>)")
    add("--epochs", type=int, help="training epochs (ADE20K 120, Cityscapes 240)")
    add("--iters", type=int, help="optimizer steps (overrides --epochs)")
    add("--batch-size", type=int, help="images per process per micro-batch (default: total batch 16 / processes)")
    add("--accum", type=int, help="micro-batches accumulated per optimizer step")
    add("--lr", type=float, help="learning rate (default: 0.01 x total batch / 16)")
    add("--head-lr-mult", type=float, help="lr multiplier of the heads (default 10; 1 from scratch)")
    add("--warmup-iters", type=int, help="linear lr warm-up steps before the poly decay (default 0; 50 from scratch)")
    add("--time-budget", type=float, metavar="MINUTES",
        help="end within this wall-clock time, validation included: a short probe fixes --iters (kept on resume); "
             "about 5 validations unless --eval-every is given")
    add("--crop-size", type=int, help="training crop side (ADE20K 480, Cityscapes 768)")
    add("--base-size", type=int, help="reference long side for the random rescale (ADE20K 520, Cityscapes 2048)")
    add("--output-stride", type=int, help="backbone output stride: 8 (default), 16 or 32")
    add("--aux-weight", type=float, help="weight of the auxiliary loss (default 0.5)")
    add("--no-aux", dest="aux", action="store_const", const=False, help="no auxiliary head")
    add("--pretrained", help="backbone weights: auto (published ImageNet weights; none for toy), none, name or "
        "file; random init switches to the from-scratch defaults (seg.config.SCRATCH_RECIPE)")
    add("--class-weights", metavar="auto|none|FILE",
        help="weigh the loss per class: auto (median frequency balancing of the train masks, computed once and "
             "cached; the CamVid from-scratch default), none, or a file of one weight per class (JSON list or "
             "object, or whitespace-separated numbers)")
    add("--class-weights-power", type=float, help="raise the class weights to this power (default 1; 0.5 tempers "
        "them: the CamVid from-scratch recipe)")
    add("--ohem", action="store_const", const=True,
        help="online hard example mining of the main head's pixels (mmsegmentation's OHEMPixelSampler)")
    add("--ohem-threshold", type=float, help="with --ohem: keep pixels whose true-class probability is below this "
        "(default 0.7)")
    add("--ohem-min-kept", type=int, help="with --ohem: keep at least this many pixels per batch (default 100000)")
    add("--amp", choices=["auto", "bf16", "fp16", "off"],
        help="mixed precision (default off; auto from scratch: bf16 where the CPU/GPU has bf16 units)")
    add("--channels-last", action="store_const", const=True, help="channels_last memory format")
    add("--compile", action="store_const", const=True, help="torch.compile the model")
    add("--deterministic", action="store_const", const=True, help="deterministic algorithms only")
    add("--workers", type=int, help="DataLoader workers per process")
    add("--seed", type=int, help="random seed (default 0)")
    add("--output-dir", help="where checkpoints and logs go (default: outputs/<dataset>_<backbone>)")
    add("--resume", help="auto (last.pth in the output directory, if any) or a checkpoint path")
    add("--eval-every", type=int, help="validate every N iterations (default: ~10 times per run)")
    add("--skip-bad-samples", action="store_const", const=True,
        help="replace an unreadable training image or mask by the next readable one (logged and counted in "
             "log.jsonl) instead of stopping the run")
    add("--val-limit", type=int, help="validate on the first N validation images only (quick runs)")
    add("--checkpoint-every", type=int, help="write last.pth every N iterations")
    add("--log-every", type=int, help="log loss, lr and throughput every N iterations (default 10)")
    add("--device", help="auto (default), cpu or cuda")
    return p


def setting_flags(p: argparse.ArgumentParser) -> Dict[str, str]:
    """Each config setting's flag in ``p`` (``aux`` -> ``--no-aux``), for :func:`seg.cli.flag_message`; a setting
    without a flag (``scale_range``: a ``--config`` file's) keeps its own name."""
    flags = {action.dest: max(action.option_strings, key=len) for action in p._actions if action.option_strings}
    return {setting: flags.get(setting, setting) for setting in FIELDS}


def config_message(error: ConfigError, p: argparse.ArgumentParser) -> str:
    """A :class:`ConfigError` worded for this command line: the flag instead of the setting, and ``--config``
    before the file it names when the error is about the config file."""
    message = flag_message(error, setting_flags(p))
    return f"--config {message}" if error.file is not None else message


def main(argv=None) -> int:
    started_at = time.monotonic()  # --time-budget counts from here
    args = parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    if args.dataset is not None and args.dataset not in list_datasets():
        parser().error(f"--dataset {args.dataset!r} is unknown; choose one of: {', '.join(list_datasets())}")
    if args.backbone is not None and args.backbone not in list_backbones():
        parser().error(f"--backbone {args.backbone!r} is unknown; choose one of: {', '.join(list_backbones())}")
    # The engine (and torch's CUDA/distributed stack) loads only once the command line is known to be sound.
    from seg.engine.trainer import Trainer, TrainingError

    try:
        cfg = build_config(flags, args.config)
        result = Trainer(cfg, started_at=started_at).run()
    except ConfigError as error:
        print(f"error: {config_message(error, parser())}", file=sys.stderr)
        return 2
    except (DataError, PretrainedWeightsError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    return 128 + result["interrupted"] if "interrupted" in result else 0


if __name__ == "__main__":
    sys.exit(main())
