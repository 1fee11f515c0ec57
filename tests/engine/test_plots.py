"""The run pictures: each writes a readable PNG, the numbers behind them are right, and matplotlib is used without
touching the user's global state (no pyplot, no backend change)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.data.camvid import CLASSES, PALETTE
from seg.engine import plots

REPO = Path(__file__).resolve().parents[2]
CAMVID_PALETTE = np.asarray(PALETTE, dtype=np.uint8)
SKY, BUILDING, ROAD, CAR = (CLASSES.index(name) for name in ("Sky", "Building", "Road", "Car"))


def _png_size(path: Path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _texts(figure):
    return [text.get_text() for ax in figure.axes for text in ax.texts]


def _scene(height=48, width=64):
    """A street-like (H, W, 3) image, its ground truth (sky over building over road, a car, a void strip) and a
    prediction that misses the car."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    truth = np.full((height, width), ROAD, dtype=np.int64)
    truth[: height // 3] = SKY
    truth[height // 3: height // 2] = BUILDING
    truth[-10:-4, 20:36] = CAR
    truth[:, :2] = 255
    prediction = truth.copy()
    prediction[truth == CAR] = ROAD
    prediction[:, :2] = SKY
    return image, truth, prediction


# --- smooth -------------------------------------------------------------------------------------------------


def test_smooth_matches_a_hand_worked_debiased_ema():
    # weight 0.5: the running sums are 0.5, 1.25, 2.125 and the debias factors 0.5, 0.75, 0.875.
    assert plots.smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 2.125 / 0.875])


def test_smooth_keeps_a_constant_constant_and_starts_at_the_first_value():
    assert plots.smooth([4.0] * 50, 0.9) == pytest.approx([4.0] * 50)
    assert plots.smooth([7.0, 0.0], 0.99)[0] == pytest.approx(7.0)
    assert plots.smooth([1.0, 2.0], 0.0) == [1.0, 2.0]


def test_smooth_passes_non_finite_values_through_without_poisoning_the_average():
    out = plots.smooth([2.0, float("nan"), 2.0], 0.6)
    assert out[0] == pytest.approx(2.0) and math.isnan(out[1]) and out[2] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        plots.smooth([1.0], 1.0)


# --- training curves ----------------------------------------------------------------------------------------


def test_training_curves_png_with_labelled_panels_and_smoothed_loss(tmp_path):
    history = {
        "loss": [(i, 2.0 / (1 + 0.01 * i) + 0.1 * math.sin(i)) for i in range(0, 500, 5)] + [(505, float("nan"))],
        "lr": [(i, 0.01 * (1 - i / 500) ** 0.9) for i in range(0, 500, 5)],
        "val mIoU": [(100, 0.21), (200, 0.38), (300, float("inf")), (400, 0.52)],
        "aux loss": [(i, 0.5) for i in range(0, 500, 50)],
    }
    path = tmp_path / "new" / "folder" / "curves.png"
    figure = plots.save_training_curves(history, path)
    width, height = _png_size(path)
    assert width >= 600 and height >= 600
    loss, lr, miou, extra = figure.axes[:4]
    assert [ax.get_ylabel() for ax in (loss, lr, extra)] == ["loss", "learning rate", "aux loss"]
    assert "%" in miou.get_ylabel() and extra.get_xlabel() == "iteration"
    assert "training curves" in figure.get_suptitle()
    raw, smoothed = loss.get_lines()
    assert [t.get_text() for t in loss.get_legend().get_texts()][0] == "raw"
    assert len(raw.get_ydata()) == 100  # the NaN point is dropped
    assert np.std(np.diff(smoothed.get_ydata())) < np.std(np.diff(raw.get_ydata()))
    # Fractions drawn in percent, the infinite point skipped.
    assert list(miou.get_lines()[0].get_ydata()) == pytest.approx([21.0, 38.0, 52.0])


def test_training_curves_before_any_data_says_so(tmp_path):
    path = tmp_path / "curves.png"
    figure = plots.save_training_curves({"loss": [], "lr": []}, path)
    assert _png_size(path)[0] > 0
    assert _texts(figure).count("no data yet") == 3  # loss, lr and the missing val mIoU


# --- per-class IoU ------------------------------------------------------------------------------------------


def test_per_class_iou_bars_na_and_mean_line(tmp_path):
    iou = {name: 0.05 * (index + 1) for index, name in enumerate(CLASSES)}
    iou["Bicyclist"] = float("nan")
    path = tmp_path / "iou" / "per_class.png"
    figure = plots.save_per_class_iou(iou, path, title="CamVid val")
    assert _png_size(path)[1] >= 250
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASSES)
    assert len(ax.patches) == 10  # no bar for the NaN class
    texts = _texts(figure)
    assert texts.count("n/a") == 1 and "5.0" in texts and "50.0" in texts
    mean = 100 * np.mean([0.05 * (i + 1) for i in range(10)])
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [f"mIoU {mean:.1f}"]
    assert ax.get_xlim() == (0, 100) and ax.get_xlabel() == "IoU (%)" and ax.get_title() == "CamVid val"


def test_per_class_iou_grows_with_the_class_count(tmp_path):
    few = plots.save_per_class_iou({name: 0.5 for name in CLASSES}, tmp_path / "few.png")
    many = plots.save_per_class_iou({f"class {i}": 0.5 for i in range(150)}, tmp_path / "many.png")
    assert _png_size(tmp_path / "many.png")[1] > 5 * _png_size(tmp_path / "few.png")[1]
    assert few is not many


# --- confusion matrix ---------------------------------------------------------------------------------------


def test_row_normalised_rows_sum_to_one_and_empty_rows_stay_zero():
    counts = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 2]])
    normalised = plots.row_normalised(counts)
    assert normalised.dtype == np.float64
    np.testing.assert_allclose(normalised.sum(axis=1), [1, 0, 1])
    np.testing.assert_allclose(normalised[0], [0.8, 0.2, 0.0])
    np.testing.assert_allclose(normalised[2], [0.25, 0.25, 0.5])


def test_confusion_matrix_png_cells_and_labels(tmp_path):
    n = len(CLASSES)
    counts = np.eye(n, dtype=np.int64) * 90
    counts[ROAD, CAR] = 10  # 10% of road read as car
    counts[CLASSES.index("Bicyclist")] = 0  # no bicyclists in the ground truth
    path = tmp_path / "out" / "confusion.png"
    figure = plots.save_confusion_matrix(counts.tolist(), CLASSES, path)
    assert min(_png_size(path)) >= 500
    ax = figure.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("prediction", "ground truth")
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert ax.get_xticklabels()[0].get_rotation() == 90
    assert figure.axes[1].get_ylabel() == "fraction of ground-truth pixels"
    texts = _texts(figure)
    assert len(texts) == n * n
    assert texts[ROAD * n + CAR] == "10" and texts[ROAD * n + ROAD] == "90" and texts[SKY * n + SKY] == "100"
    assert ax.get_images()[0].get_array()[CLASSES.index("Bicyclist")].sum() == 0


def test_confusion_matrix_with_many_classes_thins_labels_and_drops_cell_text(tmp_path):
    n = 150
    names = [f"class {i}" for i in range(n)]
    figure = plots.save_confusion_matrix(np.eye(n, dtype=np.int64), names, tmp_path / "ade.png")
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert 10 <= len(labels) <= 60 and labels[0] == "class 0"
    assert _texts(figure) == []
    assert _png_size(tmp_path / "ade.png")[0] > 2000
    with pytest.raises(ValueError):
        plots.save_confusion_matrix(np.eye(3), CLASSES, tmp_path / "bad.png")


# --- prediction panels --------------------------------------------------------------------------------------


def test_present_classes_in_class_order_without_ignore():
    _, truth, prediction = _scene()
    assert plots.present_classes(truth, prediction, num_classes=len(CLASSES)) == [SKY, BUILDING, ROAD, CAR]
    assert plots.present_classes(prediction, num_classes=len(CLASSES)) == [SKY, BUILDING, ROAD]
    assert plots.present_classes(truth, None, num_classes=len(CLASSES), ignore_index=255) == [SKY, BUILDING, ROAD, CAR]
    # ignore_index itself is dropped, not merely ids past num_classes.
    assert plots.present_classes(truth, num_classes=256, ignore_index=255) == [SKY, BUILDING, ROAD, CAR]
    assert plots.present_classes(truth, num_classes=len(CLASSES), ignore_index=SKY) == [BUILDING, ROAD, CAR]
    assert 255 in plots.present_classes(truth, num_classes=256, ignore_index=-1)


def test_prediction_panels_legend_lists_exactly_the_present_classes(tmp_path):
    image, truth, prediction = _scene()
    path = tmp_path / "panels" / "sample.png"
    figure = plots.save_prediction_panels(image, prediction, CAMVID_PALETTE, CLASSES, path,
                                          ground_truth=truth, title="0001TP_008550")
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["Sky", "Building", "Road", "Car", "ignore"]
    assert [ax.get_title() for ax in figure.axes] == ["image", "ground truth", "prediction"]
    assert not any(ax.axison for ax in figure.axes)
    # The ground-truth panel shows ignore as black and the car in CamVid's car colour.
    truth_panel = figure.axes[1].get_images()[0].get_array()
    assert tuple(truth_panel[0, 0]) == (0, 0, 0) and tuple(truth_panel[-7, 25]) == PALETTE[CAR]
    assert _png_size(path)[1] >= 400


def test_prediction_panels_without_ground_truth_is_narrower(tmp_path):
    image, truth, prediction = _scene()
    two = plots.save_prediction_panels(image, prediction, CAMVID_PALETTE, CLASSES, tmp_path / "two.png")
    plots.save_prediction_panels(image, prediction, CAMVID_PALETTE, CLASSES, tmp_path / "three.png",
                                 ground_truth=truth)
    assert [ax.get_title() for ax in two.axes] == ["image", "prediction"]
    assert [t.get_text() for t in two.legends[0].get_texts()] == ["Sky", "Building", "Road"]
    (w2, h2), (w3, h3) = _png_size(tmp_path / "two.png"), _png_size(tmp_path / "three.png")
    assert h2 == h3 and w3 > w2 + 200


# --- matplotlib state ---------------------------------------------------------------------------------------


def _python(code: str, **env) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_importing_plots_does_not_import_pyplot():
    _python("import seg.engine.plots, sys; assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")


DRAW_EVERYTHING = """
import sys, tempfile
from pathlib import Path
import numpy as np
import matplotlib
from seg import Segmenter
from seg.engine import plots
backend = matplotlib.get_backend(auto_select=False)
params = {k: matplotlib.rcParams[k] for k in matplotlib.rcParams if k != "backend"}
out = Path(tempfile.mkdtemp())
names = ["Sky", "Building", "Road"]
palette = np.array([[128, 128, 128], [128, 0, 0], [128, 64, 128]], dtype=np.uint8)
mask = np.array([[0, 1], [2, 255]])
plots.save_training_curves({"loss": [(0, 1.0), (1, 0.5)], "val mIoU": [(1, 0.3)]}, out / "c.png")
plots.save_per_class_iou({"Sky": 0.9, "Building": float("nan"), "Road": 0.5}, out / "i.png")
plots.save_confusion_matrix(np.eye(3), names, out / "m.png")
plots.save_prediction_panels(np.zeros((2, 2, 3), np.uint8), mask, palette, names, out / "p.png", ground_truth=mask)
assert all((out / f).stat().st_size > 0 for f in ("c.png", "i.png", "m.png", "p.png"))
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
assert matplotlib.get_backend(auto_select=False) == backend, (backend, matplotlib.get_backend(auto_select=False))
assert {k: matplotlib.rcParams[k] for k in matplotlib.rcParams if k != "backend"} == params, "rcParams changed"
print(backend)
"""


@pytest.mark.parametrize("backend", [None, "svg"])
def test_drawing_leaves_pyplot_unimported_and_the_backend_unchanged(backend):
    # None: no backend chosen yet, which must stay unresolved; "svg": a user's explicit choice, which must stay.
    _python(DRAW_EVERYTHING, **({"MPLBACKEND": backend} if backend else {}))
