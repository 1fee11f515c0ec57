"""bench/camvid_budget.py: the smp reference trains under its wall-clock budget with the poly schedule and is scored
at full label resolution; user mistakes are one line (the real 15-minute comparison is run by hand)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "camvid_budget.py"


@pytest.fixture(scope="module")
def bench():
    """The script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("camvid_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so DataLoader workers and pickling find its classes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_reference_trains_on_poly_and_is_scored_at_full_label_resolution(bench, shared):
    root = shared("data", "camvid")
    smp = pytest.importorskip("segmentation_models_pytorch", reason="the reference pipeline is built with smp")
    from seg.data import build_dataset

    minutes = 0.05
    model, stats = bench.train_reference(root, minutes, threads=None, seed=0, train_limit=16, progress=False)

    assert isinstance(model, smp.DeepLabV3)
    assert model.name == "deeplabv3-tu-resnest26d" and stats["encoder"] == "tu-resnest26d"
    assert model.segmentation_head[0].out_channels == 11
    assert stats["steps"] >= 1 and len(stats["loss"]) == len(stats["lr"]) == stats["steps"]
    assert all(math.isfinite(loss) for loss in stats["loss"])
    lrs, elapsed = stats["lr"], stats["lr_elapsed_s"]
    assert lrs[0] <= 0.02 and all(b <= a for a, b in zip(lrs, lrs[1:]))
    budget = minutes * 60
    assert lrs == pytest.approx([0.02 * (1 - t / budget) ** 0.9 for t in elapsed], rel=1e-12)

    val = build_dataset("camvid", "val", root=root, transforms=None)
    metrics = bench.score(model, val, (256, 192), limit=4)
    masks = [val.load(i)["mask"] for i in range(4)]
    assert all(mask.shape == (360, 480) for mask in masks)
    labelled = sum(int((mask != 255).sum()) for mask in masks)
    assert metrics["images"] == 4
    assert int(np.asarray(metrics["confusion_matrix"]).sum()) == labelled == metrics["labelled_pixels"]
    assert 0.0 <= metrics["mIoU"] <= 1.0 and 0.0 <= metrics["pixAcc"] <= 1.0
    assert set(metrics["per_class"]) == set(val.classes) and len(val.classes) == 11


def test_a_missing_seg_config_is_one_line_naming_it(bench, tmp_path, capsys):
    missing = tmp_path / "no_such_config.toml"
    status = bench.main(["--only", "seg", "--seg-config", str(missing), "--out", str(tmp_path / "out"),
                         "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert status != 0
    assert err.count("\n") == 1 and str(missing) in err and "Traceback" not in err


def test_a_missing_data_root_names_the_folder_and_the_layout(bench, tmp_path, capsys):
    status = bench.main(["--only", "reference", "--data-root", str(tmp_path / "camvid"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert str(tmp_path / "camvid") in err and "trainannot/" in err and "valannot/" in err
