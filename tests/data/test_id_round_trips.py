"""Label values round trip through every dataset's own file format, checked against references outside seg.

Two directions, for each dataset with label files:

- a prediction of every train class, saved by ``python -m seg.eval --save-pred`` in the dataset's own label values,
  holds the value the reference gives for that class and reads back through the dataset's reader as the class;
- a ground-truth file holding every value the format defines maps to the reference's train id (or to ignore).

References: Cityscapes, cityscapesScripts' ``labels`` table (a test extra); ADE20K, the development kit's
``objectInfo150.csv`` (stored value = its ``Idx``); CamVid, the SegNet release's class order as ../shared/data
documents it; the folder dataset, its documented layout (line i of classes.txt = stored value i, 255 = ignore).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

import seg.eval as seg_eval
from seg.data import DataError, build_dataset, list_datasets, read_mask
from seg.data.base import IGNORE_INDEX
from prediction_stub import PredictionStub, card_checkpoint


@dataclass
class Reference:
    """What a dataset's label files mean, from a source outside seg: stored value -> train id (IGNORE_INDEX for
    ignored values) and the class names in train-id order."""

    read: Dict[int, int]
    names: List[str]

    def stored(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) train ids -> the stored values the reference gives each class."""
        export = {train: stored for stored, train in self.read.items() if train != IGNORE_INDEX}
        classes = [train for train in self.read.values() if train != IGNORE_INDEX]
        assert len(export) == len(classes), "the reference stores a class under two values"
        assert sorted(export) == list(range(len(self.names)))
        table = np.zeros(256, np.uint8)
        for train, value in export.items():
            table[train] = value
        return table[train_ids]


def cityscapes_reference(shared: Callable[..., Path]) -> Reference:
    labels = pytest.importorskip("cityscapesscripts.helpers.labels", reason="cityscapesscripts (test extra) needed")
    trained = sorted((label for label in labels.labels if 0 <= label.trainId < IGNORE_INDEX), key=lambda lb: lb.trainId)
    read = {label.id: label.trainId if 0 <= label.trainId < IGNORE_INDEX else IGNORE_INDEX
            for label in labels.labels if label.id >= 0}  # id -1 (license plate) has no stored value
    return Reference(read, [label.name for label in trained])


def cityscapes_train_ids_reference(shared: Callable[..., Path]) -> Reference:
    """What the official converter writes into ``*_gtFine_labelTrainIds.png``: train ids, 255 for the rest."""
    by_ids = cityscapes_reference(shared)
    return Reference({**{train: train for train in range(len(by_ids.names))}, IGNORE_INDEX: IGNORE_INDEX},
                     by_ids.names)


def ade20k_reference(shared: Callable[..., Path]) -> Reference:
    with open(shared("data", "ade20k", "objectInfo150.csv"), newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: int(row["Idx"]))
    assert [int(row["Idx"]) for row in rows] == list(range(1, 151))
    read = {0: IGNORE_INDEX, **{int(row["Idx"]): int(row["Idx"]) - 1 for row in rows}}  # 0 = "other"
    return Reference(read, [row["Name"] for row in rows])


def camvid_reference(shared: Callable[..., Path]) -> Reference:
    text = " ".join(shared("data", "README.md").read_text().split())
    found = re.search(r"0\.\.10 = ([^;]+); 11 = void", text)
    assert found, "../shared/data/README.md no longer states CamVid's class order"
    names = [name.strip() for name in found.group(1).split(",")]
    assert len(names) == 11
    return Reference({**{value: value for value in range(11)}, 11: IGNORE_INDEX}, names)


FOLDER_CLASSES = ["background", "person", "bicycle", "car", "tree", "sky", "road"]


def folder_reference(shared: Callable[..., Path]) -> Reference:
    values = range(len(FOLDER_CLASSES))
    return Reference({**{value: value for value in values}, IGNORE_INDEX: IGNORE_INDEX}, list(FOLDER_CLASSES))


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_cityscapes(root: Path, image: np.ndarray, mask: np.ndarray, kind: str = "labelIds") -> Tuple[Path, str]:
    """One val frame in the official layout; returns its mask file and the stem seg.eval names its prediction."""
    frame = "lindau_000000_000019"
    save_png(root / "leftImg8bit" / "val" / "lindau" / f"{frame}_leftImg8bit.png", image)
    mask_path = root / "gtFine" / "val" / "lindau" / f"{frame}_gtFine_{kind}.png"
    save_png(mask_path, mask)
    return mask_path, f"{frame}_leftImg8bit"


def write_cityscapes_train_ids(root: Path, image: np.ndarray, mask: np.ndarray) -> Tuple[Path, str]:
    return write_cityscapes(root, image, mask, kind="labelTrainIds")


def write_ade20k(root: Path, image: np.ndarray, mask: np.ndarray) -> Tuple[Path, str]:
    package = root / "ADEChallengeData2016"
    (package / "images" / "validation").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(package / "images" / "validation" / "ADE_val_00000001.jpg", quality=95)
    mask_path = package / "annotations" / "validation" / "ADE_val_00000001.png"
    save_png(mask_path, mask)
    return mask_path, "ADE_val_00000001"


def write_camvid(root: Path, image: np.ndarray, mask: np.ndarray) -> Tuple[Path, str]:
    save_png(root / "val" / "0001TP_006690.png", image)
    save_png(root / "valannot" / "0001TP_006690.png", mask)
    return root / "valannot" / "0001TP_006690.png", "0001TP_006690"


def write_folder(root: Path, image: np.ndarray, mask: np.ndarray) -> Tuple[Path, str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\n")
    save_png(root / "images" / "val" / "street.png", image)
    save_png(root / "masks" / "val" / "street.png", mask)
    return root / "masks" / "val" / "street.png", "street"


# label format -> (its reference, the writer of a one-image val split in the dataset's layout)
FORMATS = {
    "cityscapes": (cityscapes_reference, write_cityscapes),
    "cityscapes-labelTrainIds": (cityscapes_train_ids_reference, write_cityscapes_train_ids),
    "ade20k": (ade20k_reference, write_ade20k),
    "camvid": (camvid_reference, write_camvid),
    "folder": (folder_reference, write_folder),
}
# Predictions are saved as label ids, whatever the label files of the split: labelTrainIds has no export.
EXPORTED = ["cityscapes", "ade20k", "camvid", "folder"]


def dataset_of(name: str) -> str:
    return name.split("-")[0]


def every_class_map(num_classes: int, block: int = 3) -> np.ndarray:
    """(H, W) uint8 train ids: a block x block square of each class on a near-square grid, the grid's spare
    squares repeating the first classes."""
    columns = math.ceil(math.sqrt(num_classes))
    rows = math.ceil(num_classes / columns)
    grid = (np.arange(rows * columns) % num_classes).reshape(rows, columns)
    return np.kron(grid, np.ones((block, block), np.int64)).astype(np.uint8)


def test_every_dataset_with_label_files_has_a_round_trip():
    """A newly registered dataset must join FORMATS; toy is generated in memory and has no label files."""
    assert set(list_datasets()) - {"toy"} == {dataset_of(name) for name in FORMATS} == set(EXPORTED)


@pytest.mark.parametrize("name", EXPORTED)
def test_a_prediction_of_every_class_saved_by_eval_reads_back_as_that_class(name, shared, tmp_path, monkeypatch):
    reference, write = FORMATS[name]
    reference = reference(shared)
    classes = every_class_map(len(reference.names))
    image = np.random.default_rng(0).integers(0, 256, classes.shape + (3,), dtype=np.uint8)
    root = tmp_path / name
    mask_path, stem = write(root, image, reference.stored(classes))  # ground truth: the prediction itself

    stub = PredictionStub([classes], len(reference.names))
    monkeypatch.setattr(seg_eval, "load_model", lambda card, weights, source: stub)
    for plot in ("save_confusion_matrix", "save_per_class_iou"):  # seconds for 150 classes; tested elsewhere
        monkeypatch.setattr(seg_eval, plot, lambda *args, **kwargs: None)
    checkpoint = card_checkpoint(tmp_path / "stub.pth", name, len(reference.names))
    # --base-size: the image's own long side, so the prediction is made at its resolution, unresized.
    code = seg_eval.main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--save-pred",
                          str(tmp_path / "pred"), "--json", str(tmp_path / "m.json"), "--base-size",
                          str(max(classes.shape)), "--workers", "0", "--device", "cpu"])
    assert code == 0 and stub.calls == 1
    metrics = json.loads((tmp_path / "m.json").read_text())
    # The ground truth, read by the dataset, equals the prediction on every pixel: its values meant those classes.
    assert metrics["pixAcc"] == 1.0 and metrics["mIoU"] == 1.0
    assert [scores["IoU"] for scores in metrics["per_class"].values()] == [1.0] * len(reference.names)

    saved = read_mask(tmp_path / "pred" / f"{stem}.png")
    assert np.array_equal(saved, reference.stored(classes))
    mask_path.write_bytes((tmp_path / "pred" / f"{stem}.png").read_bytes())
    read_back = build_dataset(dataset_of(name), "val", root=root).load(0)["mask"]
    assert np.array_equal(read_back, classes)


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_ground_truth_file_holding_every_stored_value_maps_to_the_reference_train_id(name, shared, tmp_path):
    reference, write = FORMATS[name]
    reference = reference(shared)
    values = np.array(sorted(reference.read), np.uint8)
    stored = np.stack([values, values[::-1]])  # each value twice, at two positions
    image = np.zeros(stored.shape + (3,), np.uint8)
    mask_path, _ = write(tmp_path / name, image, stored)
    dataset = build_dataset(dataset_of(name), "val", root=tmp_path / name)
    if dataset_of(name) == "cityscapes":  # the label files present choose the mode
        assert dataset.label_mode == ("labelTrainIds" if name.endswith("labelTrainIds") else "labelIds")
    expected = np.vectorize(reference.read.get)(stored)
    assert np.array_equal(dataset.load(0)["mask"], expected)
    assert list(dataset.classes) == reference.names

    # A value the format does not define is refused, naming it, not read as some class.
    undefined = next(value for value in range(256) if value not in reference.read)
    save_png(mask_path, np.full(stored.shape, undefined, np.uint8))
    with pytest.raises(DataError, match=f"label values {undefined} are outside"):
        dataset.load(0)
