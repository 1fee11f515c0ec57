"""The benchmark scripts run (a smoke test of the tools, not of the speed: speed is measured in bench/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_data_pipeline_bench_prints_its_table(shared, tmp_path):
    data = shared("data")
    out = tmp_path / "rates.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "data_pipeline.py"), "--data", str(data), "--seconds", "0.05",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| ADE20K 683x512 JPEG, crop 512" in result.stdout and "| Cityscapes 2048x1024 PNG" in result.stdout
    rows = json.loads(out.read_text())
    assert [row["case"] for row in rows] == [line.split("|")[1].strip() for line in result.stdout.splitlines()
                                             if line.startswith("| ADE20K") or line.startswith("| Cityscapes")]
    for row in rows:  # the ratios are the quotients of the rates, and the table prints the report's numbers
        assert row["seg_vs_decode"] == row["seg"] / row["decode_only"]
        assert row["seg_no_retry_vs_reference"] == row["seg_no_retry"] / row["albumentations_reference"]
        printed = next(line for line in result.stdout.splitlines() if line.startswith(f"| {row['case']} "))
        cells = [cell.strip() for cell in printed.split("|")[2:-1]]
        assert cells == [f"{row[key]:.1f}" for key in ("decode_only", "seg", "seg_no_retry",
                                                       "albumentations_reference")] + [
            f"{row['seg_vs_decode']:.2f}", f"{row['seg_no_retry_vs_reference']:.2f}"]


def test_data_pipeline_bench_names_a_missing_data_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "data_pipeline.py"), "--data", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--data" in result.stderr and "Traceback" not in result.stderr


def test_cuda_checks_script_runs_on_cpu_and_its_parity_checks_pass():
    """The GPU script is only run by hand on a lent GPU: this keeps it from rotting between such sessions."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cuda_checks.py"), "--device", "cpu", "--backbone", "resnest14",
         "--batch", "1", "--size", "32", "--skip-compile"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for start in ("parity fp32", "inference fp32 batch 1", "inference bf16 batch 1", "train step fp32 batch 1",
                  "train step bf16 batch 1", "multi-scale + flip", "compiled inference parity: skipped"):
        assert any(line.startswith(start) for line in lines), (start, result.stdout)
    assert lines[-1] == "PASS"
