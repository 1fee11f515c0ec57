"""Training curves of runs side by side (e.g. the same recipe in fp32 and in bf16), from their ``log.jsonl``.

    python bench/precision_curves.py fp32=/tmp/runs/camvid_fp32 bf16=/tmp/runs/camvid_bf16 \
        --out bench/camvid_bf16_vs_fp32.png

Draws the training loss and the validation mIoU against the iteration, one line per run, prints the validation
points as a table, and exits 2 with one line when a run folder has no log. Needs matplotlib.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from seg.cli import ArgumentParser  # noqa: E402


def read_log(folder: Path) -> Tuple[List[Tuple[int, float]], List[Tuple[int, float]]]:
    """(loss points, validation mIoU points) of a run's log.jsonl."""
    loss, miou = [], []
    for line in (folder / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            loss.append((record["iteration"], record["loss"]))
        if "mIoU" in record:
            miou.append((record["iteration"], record["mIoU"]))
    return loss, miou


def main(argv=None) -> int:
    p = ArgumentParser(prog="python bench/precision_curves.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="NAME=FOLDER", help="a label and a run's output folder")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    curves: Dict[str, Tuple[list, list]] = {}
    for run in args.runs:
        name, _, folder = run.partition("=")
        if not folder or not (Path(folder) / "log.jsonl").is_file():
            p.error(f"{run}: expected NAME=FOLDER with FOLDER/log.jsonl")
        curves[name] = read_log(Path(folder))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        p.error("needs matplotlib (pip install matplotlib)")

    figure, (loss_axis, miou_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (loss, miou) in curves.items():
        loss_axis.plot(*zip(*loss), label=name)
        miou_axis.plot(*zip(*miou), marker="o", label=name)
    loss_axis.set(title="training loss", xlabel="iteration")
    miou_axis.set(title="validation mIoU", xlabel="iteration")
    for axis in (loss_axis, miou_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    iterations = sorted({it for _, miou in curves.values() for it, _ in miou})
    print("| iteration | " + " | ".join(f"{name} val mIoU" for name in curves) + " |")
    print("|---|" + "---|" * len(curves))
    for it in iterations:
        cells = [next((f"{100 * v:.2f}" for i, v in miou if i == it), "") for _, miou in curves.values()]
        print(f"| {it} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
