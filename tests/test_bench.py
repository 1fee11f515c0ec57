"""``python -m seg.bench --quick`` runs end to end (a smoke test of the tool; speed is measured in bench/)."""

from __future__ import annotations

import json
import subprocess
import sys


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
    for row in report["rows"]:
        assert row["images_per_s"] > 0 and row["gmacs_per_image"] > 0 and row["seg_speedup"] > 0
        # Each round's ratio bounds the ratio of the medians (a round-by-round bound carries over to medians).
        low, high = row["seg_speedup_range"]
        assert low * (1 - 1e-9) <= row["seg_speedup"] <= high * (1 + 1e-9), row
        assert len(row["round_seconds"]) == report["repeats"] and min(row["round_seconds"]) > 0
    assert report["ms_flip"]["overhead"] > 0
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
    assert rows["fp32 seg"]["versus"] == "seg" and rows["fp32 seg"]["seg_speedup"] > 0
    references = [row for name, row in rows.items() if "seg" not in name]
    assert references and all(row["dtype"] == "bf16" and row["autocast"] for row in references)
    assert "bf16 units: " in report["header"] and "dtype bf16" in report["header"]


def test_the_loss_module_ignores_the_datasets_ignore_value():
    from seg.data.base import IGNORE_INDEX
    from seg.engine.loss import IGNORE_INDEX as LOSS_IGNORE_INDEX

    assert LOSS_IGNORE_INDEX == IGNORE_INDEX
