"""``python -m seg.bench --quick`` runs end to end (a smoke test of the tool; speed is measured in bench/): every
derived number of its report is recomputed from the measured times and FLOPs, and the table prints those numbers."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

import pytest

from seg.engine.inference import MS_SCALES


def printed_rows(stdout: str) -> dict:
    """The table's body rows, keyed (case, implementation as printed), as lists of stripped cells."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if len(cells) >= 8 and cells[0] != "case" and set(cells[0]) != {"-"}:
            rows[(cells[0], cells[1])] = cells
    return rows


def check_rows_follow_from_their_timings(report: dict, stdout: str) -> None:
    """Images/s, GMACs, latency and seg's ratio to each contender recomputed from each row's own round times and
    FLOP count; the printed table shows exactly these values."""
    table = printed_rows(stdout)
    rows = {(row["case"], row["implementation"]): row for row in report["rows"]}
    assert len(table) == len(rows)
    for (case, implementation), row in rows.items():
        batch = re.search(r"batch (\d+)", case)
        images = int(batch.group(1)) if batch else 1
        assert len(row["round_seconds"]) == report["repeats"]
        assert row["latency_s"] == statistics.median(row["round_seconds"])
        assert row["images_per_s"] == pytest.approx(images / row["latency_s"], rel=1e-12)
        assert row["gmacs_per_image"] == pytest.approx(row["flops"] / 2 / images / 1e9, rel=1e-12)
        own = implementation.startswith("seg")
        if own:
            assert row["seg_speedup"] == 1.0 and row["seg_speedup_range"] == [1.0, 1.0]
        else:
            versus = rows[(case, row["versus"])]
            assert row["seg_speedup"] == pytest.approx(row["latency_s"] / versus["latency_s"], rel=1e-12)
            per_round = [theirs / ours for ours, theirs in zip(versus["round_seconds"], row["round_seconds"],
                                                              strict=True)]
            assert row["seg_speedup_range"] == [min(per_round), max(per_round)]
            # Each round's ratio bounds the ratio of the medians (a round-by-round bound carries over to medians).
            low, high = row["seg_speedup_range"]
            assert low * (1 - 1e-9) <= row["seg_speedup"] <= high * (1 + 1e-9), row
        cells = table[(case, implementation + (" (NHWC)" if row["channels_last"] and not own else ""))]
        assert cells[4] == f"{row['images_per_s']:.2f}" and cells[5] == f"{row['latency_s'] * 1000:.1f}ms"
        low, high = row["seg_speedup_range"]
        assert cells[-1] == ("" if own else f"{row['seg_speedup']:.2f}x ({low:.2f}-{high:.2f})")


def test_quick_bench_prints_every_case_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "seg.bench", "--quick", "--threads", "2", "--repeats", "2", "--json",
                             str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    cases = {row["case"] for row in report["rows"]}
    assert len(cases) == 9 and sum("train step" in case for case in cases) == 2
    implementations = {row["implementation"] for row in report["rows"]}
    assert {"seg", "official resnest", "timm resnest50d", "torchvision deeplabv3_resnet50",
            "official resnest50 + torchvision heads"} <= implementations
    check_rows_follow_from_their_timings(report, result.stdout)
    ms_flip = report["ms_flip"]
    passes = 2 * len(MS_SCALES["ade20k"])  # every scale, plain and mirrored
    assert ms_flip["case"].endswith(f"({passes} passes)")
    assert ms_flip["overhead"] == ms_flip["seconds"] / ms_flip["passes_alone_seconds"]
    assert (f"{ms_flip['case']}: {ms_flip['seconds']:.3f} s, its {passes} passes alone "
            f"{ms_flip['passes_alone_seconds']:.3f} s: overhead {ms_flip['overhead']:.3f}x") in result.stdout
    assert "QUICK sizes" in result.stdout and "| seg " in result.stdout


def test_bf16_bench_runs_seg_cast_references_under_autocast_and_fp32_beside(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "seg.bench", "--quick", "--threads", "2", "--repeats", "1",
                             "--dtype", "bf16", "--channels-last", "--only", "DeepLabV3-ResNeSt-50 inference",
                             "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {row["implementation"]: row for row in report["rows"]}
    assert (rows["seg"]["dtype"], rows["seg"]["autocast"]) == ("bf16", False)  # weights cast, fused bf16 kernels
    assert (rows["fp32 seg"]["dtype"], rows["fp32 seg"]["autocast"]) == ("fp32", False)
    assert rows["fp32 seg"]["versus"] == "seg"
    check_rows_follow_from_their_timings(report, result.stdout)
    references = [row for name, row in rows.items() if "seg" not in name]
    assert references and all(row["dtype"] == "bf16" and row["autocast"] for row in references)
    assert "bf16 units: " in report["header"] and "dtype bf16" in report["header"]
    assert report["ms_flip"] is None  # --only left the multi-scale case out
