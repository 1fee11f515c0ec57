"""Dataset adapters on the real samples in ../shared/data (official layouts) and on crafted folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seg.data import DataError, build_dataset, list_datasets
from seg.data import cityscapes as cityscapes_module
from seg.data.base import IGNORE_INDEX


def raw(path):
    return np.asarray(Image.open(path))


def test_registry_lists_every_adapter_and_rejects_unknown_names():
    assert list_datasets() == ["ade20k", "camvid", "cityscapes", "folder", "toy"]
    with pytest.raises(ValueError, match="unknown dataset 'coco'.*ade20k"):
        build_dataset("coco")


def test_ade20k_maps_values_minus_one_and_zero_to_ignore(shared):
    root = shared("data", "ade20k")
    dataset = build_dataset("ade20k", "val", root=root)
    assert len(dataset) == 3 and dataset.num_classes == 150
    assert dataset.classes[0] == "wall" and dataset.classes[149] == "flag"
    for index, sample in enumerate(dataset.samples):
        item = dataset[index]
        stored = raw(sample.mask)
        expected = np.where(stored == 0, IGNORE_INDEX, stored.astype(np.int64) - 1)
        assert np.array_equal(item["mask"], expected)
        assert item["image"].shape == stored.shape + (3,) and item["image"].dtype == np.uint8
        assert np.array_equal(item["image"], np.asarray(Image.open(sample.image).convert("RGB")))
    assert [s.image.name for s in dataset.samples] == sorted(s.image.name for s in dataset.samples)
    # The folder holding ADEChallengeData2016/ and that folder itself are both accepted.
    assert len(build_dataset("ade20k", "val", root=root / "ADEChallengeData2016")) == 3


def test_cityscapes_label_ids_follow_the_official_table(shared):
    labels = pytest.importorskip("cityscapesscripts.helpers.labels", reason="cityscapesscripts (test extra) needed")
    official = np.full(256, 255, dtype=np.int64)
    for label in labels.labels:
        if label.id >= 0:
            official[label.id] = 255 if label.trainId in (-1, 255) else label.trainId
    dataset = build_dataset("cityscapes", "train", root=shared("data", "cityscapes"), label_mode="labelIds")
    assert dataset.label_mode == "labelIds" and len(dataset) == 8
    for index, sample in enumerate(dataset.samples):
        item = dataset[index]
        assert np.array_equal(item["mask"], official[raw(sample.mask)])
        assert item["image"].shape == (1024, 2048, 3)
    trained = sorted((label for label in labels.labels if 0 <= label.trainId < 255), key=lambda lb: lb.trainId)
    assert dataset.classes == tuple(label.name for label in trained)
    assert [tuple(colour) for colour in dataset.palette] == [label.color for label in trained]


def test_cityscapes_prepared_mode_reads_label_train_ids_and_auto_prefers_them(shared):
    root = shared("data", "cityscapes")
    dataset = build_dataset("cityscapes", "train", root=root)  # auto: every frame has labelTrainIds
    assert dataset.label_mode == "labelTrainIds"
    for index, sample in enumerate(dataset.samples):
        assert sample.mask.name.endswith("_gtFine_labelTrainIds.png")
        assert np.array_equal(dataset[index]["mask"], raw(sample.mask))
    # The val sample ships labelIds only, so auto falls back to the table.
    assert build_dataset("cityscapes", "val", root=root).label_mode == "labelIds"
    with pytest.raises(DataError, match="label_mode 'trainIds'"):
        build_dataset("cityscapes", "val", root=root, label_mode="trainIds")


def test_cityscapes_label_tables_are_consistent():
    assert len(cityscapes_module.CLASSES) == 19
    assert cityscapes_module.TRAIN_ID_TO_ID[0] == 7 and cityscapes_module.TRAIN_ID_TO_ID[18] == 33


def test_camvid_void_becomes_ignore(shared):
    dataset = build_dataset("camvid", "val", root=shared("data", "camvid"))
    assert len(dataset) == 101 and dataset.classes[0] == "Sky"
    for index in (0, 50, 100):
        stored = raw(dataset.samples[index].mask)
        item = dataset[index]
        assert np.array_equal(item["mask"], np.where(stored == 11, IGNORE_INDEX, stored))
        assert item["image"].shape == (360, 480, 3)
    assert len(build_dataset("camvid", "train", root=shared("data", "camvid"))) == 367


def test_toy_is_deterministic_and_has_every_class():
    first, again = build_dataset("toy", "train"), build_dataset("toy", "train")
    assert len(first) == 96 and first.classes == ("background", "disc", "box", "stripe")
    a, b = first[5], again[5]
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert not np.array_equal(first[5]["image"], first[6]["image"])
    assert not np.array_equal(first[0]["image"], build_dataset("toy", "val")[0]["image"])
    seen = set()
    for index in range(20):
        seen |= set(np.unique(first[index]["mask"]).tolist())
    assert seen == {0, 1, 2, 3}


def test_default_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SEG_DATA_ROOT", str(tmp_path))
    with pytest.raises(DataError, match=f"ade20k data not found at {tmp_path / 'ade20k'} \\(\\$SEG_DATA_ROOT\\)"):
        build_dataset("ade20k", "train")
    monkeypatch.delenv("SEG_DATA_ROOT")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="camvid data not found at datasets/camvid .*expected train/"):
        build_dataset("camvid", "train")


def test_missing_split_names_the_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=f"camvid train split: {tmp_path / 'trainannot'} does not exist"):
        build_dataset("camvid", "train", root=tmp_path)
    with pytest.raises(DataError, match="unknown split 'training'"):
        build_dataset("camvid", "training", root=tmp_path)


# --- the custom folder dataset ---------------------------------------------------------------------------


def make_folder_dataset(root, masks, classes="background\ncat 255 0 0\ndog 0 255 0\n", size=(24, 32)):
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text(classes)
    rng = np.random.default_rng(0)
    for name, mask in masks.items():
        image = rng.integers(0, 255, size + (3,), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / "train" / f"{name}.jpg")
        if mask is not None:
            Image.fromarray(mask).save(root / "masks" / "train" / f"{name}.png")
    return root


def test_folder_dataset_pairs_files_and_reads_the_class_list(tmp_path):
    mask = np.zeros((24, 32), np.uint8)
    mask[5:10] = 2
    mask[0] = 255
    make_folder_dataset(tmp_path, {"b": mask, "a": mask})
    dataset = build_dataset("folder", "train", root=tmp_path)
    assert dataset.classes == ("background", "cat", "dog")
    assert [s.image.name for s in dataset.samples] == ["a.jpg", "b.jpg"]
    assert np.array_equal(dataset[0]["mask"], mask)


def test_folder_dataset_reports_unpaired_files(tmp_path):
    make_folder_dataset(tmp_path, {"a": np.zeros((24, 32), np.uint8), "b": None})
    (tmp_path / "masks" / "train" / "c.png").write_bytes((tmp_path / "masks" / "train" / "a.png").read_bytes())
    with pytest.raises(DataError, match="1 image\\(s\\) without a mask, e.g. .*b.jpg; 1 mask\\(s\\) without an image"):
        build_dataset("folder", "train", root=tmp_path)
    lenient = build_dataset("folder", "train", root=tmp_path, allow_unpaired=True)
    assert len(lenient) == 1 and len(lenient.problems) == 2


def test_label_values_outside_the_range_are_reported_with_the_file(tmp_path):
    mask = np.zeros((24, 32), np.uint8)
    mask[3, 3], mask[4, 4] = 3, 9
    make_folder_dataset(tmp_path, {"a": mask})
    with pytest.raises(DataError, match=r"a.png: label values 3, 9 are outside .* \(0..2 for 3 classes"):
        build_dataset("folder", "train", root=tmp_path)[0]


def test_image_mask_size_mismatch_is_reported(tmp_path):
    make_folder_dataset(tmp_path, {"a": np.zeros((20, 32), np.uint8)})
    with pytest.raises(DataError, match="a.png: mask is 32x20 but its image .*a.jpg is 32x24"):
        build_dataset("folder", "train", root=tmp_path)[0]


def test_empty_class_list_is_refused(tmp_path):
    make_folder_dataset(tmp_path, {"a": np.zeros((24, 32), np.uint8)}, classes="# nothing\n\n")
    with pytest.raises(DataError, match="classes.txt: no class names"):
        build_dataset("folder", "train", root=tmp_path)
