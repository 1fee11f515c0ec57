"""Cityscapes (fine annotations): 19 training classes from the official label table.

Two label sources, chosen by ``label_mode``:

- ``labelIds``: the shipped ``*_gtFine_labelIds.png`` mapped with the official id -> trainId table.
- ``labelTrainIds``: ``*_gtFine_labelTrainIds.png`` written by the official converter from the polygons
  (``datasets/prepare_cityscapes.py``). It differs from the table on about 0.5 % of pixels; mmsegmentation and
  most published numbers use it.
- ``auto`` (default): ``labelTrainIds`` when every sample of the split has one, else ``labelIds``; the choice
  is ``dataset.label_mode``.
"""

from __future__ import annotations

from .base import (
    IGNORE_INDEX,
    Sample,
    SegmentationDataset,
    check_split,
    label_lookup,
    pair_by_stem,
    require_split_dirs,
    resolve_root,
)
from .io import DataError, list_files
from .registry import DATASETS

LAYOUT = "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png"

# (id, name, trainId, colour) from cityscapesScripts' helpers/labels.py; trainId 255 = ignored in training.
LABELS = (
    (0, "unlabeled", 255, (0, 0, 0)),
    (1, "ego vehicle", 255, (0, 0, 0)),
    (2, "rectification border", 255, (0, 0, 0)),
    (3, "out of roi", 255, (0, 0, 0)),
    (4, "static", 255, (0, 0, 0)),
    (5, "dynamic", 255, (111, 74, 0)),
    (6, "ground", 255, (81, 0, 81)),
    (7, "road", 0, (128, 64, 128)),
    (8, "sidewalk", 1, (244, 35, 232)),
    (9, "parking", 255, (250, 170, 160)),
    (10, "rail track", 255, (230, 150, 140)),
    (11, "building", 2, (70, 70, 70)),
    (12, "wall", 3, (102, 102, 156)),
    (13, "fence", 4, (190, 153, 153)),
    (14, "guard rail", 255, (180, 165, 180)),
    (15, "bridge", 255, (150, 100, 100)),
    (16, "tunnel", 255, (150, 120, 90)),
    (17, "pole", 5, (153, 153, 153)),
    (18, "polegroup", 255, (153, 153, 153)),
    (19, "traffic light", 6, (250, 170, 30)),
    (20, "traffic sign", 7, (220, 220, 0)),
    (21, "vegetation", 8, (107, 142, 35)),
    (22, "terrain", 9, (152, 251, 152)),
    (23, "sky", 10, (70, 130, 180)),
    (24, "person", 11, (220, 20, 60)),
    (25, "rider", 12, (255, 0, 0)),
    (26, "car", 13, (0, 0, 142)),
    (27, "truck", 14, (0, 0, 70)),
    (28, "bus", 15, (0, 60, 100)),
    (29, "caravan", 255, (0, 0, 90)),
    (30, "trailer", 255, (0, 0, 110)),
    (31, "train", 16, (0, 80, 100)),
    (32, "motorcycle", 17, (0, 0, 230)),
    (33, "bicycle", 18, (119, 11, 32)),
)
TRAIN_LABELS = sorted((train_id, name, colour) for _, name, train_id, colour in LABELS if train_id != IGNORE_INDEX)
CLASSES = tuple(name for _, name, _ in TRAIN_LABELS)
PALETTE = tuple(colour for _, _, colour in TRAIN_LABELS)
ID_TO_TRAIN_ID = {label_id: train_id for label_id, _, train_id, _ in LABELS}
TRAIN_ID_TO_ID = {train_id: label_id for label_id, _, train_id, _ in LABELS if train_id != IGNORE_INDEX}
LABEL_MODES = ("auto", "labelIds", "labelTrainIds")


def _frame_key(suffix: str):
    """city/frame of a file named <city>_<seq>_<frame><suffix> inside its city folder."""
    return lambda path: f"{path.parent.name}/{path.name[: -len(suffix)]}"


@DATASETS.register
def cityscapes(
    split: str = "train", root=None, transforms=None, label_mode: str = "auto", allow_unpaired: bool = False
) -> SegmentationDataset:
    """Cityscapes fine: ``train`` (2,975), ``val`` (500), ``test`` (1,525, no public labels: masks are None)."""
    check_split(split)
    if label_mode not in LABEL_MODES:
        raise DataError(f"unknown Cityscapes label_mode {label_mode!r}; choose one of: {', '.join(LABEL_MODES)}")
    base = resolve_root("cityscapes", root, LAYOUT)
    images_dir = base / "leftImg8bit" / split
    require_split_dirs("cityscapes", split, LAYOUT, images_dir)
    images = list_files(images_dir, (".png",))
    if split == "test":
        samples, problems = [Sample(image, None) for image in images], []
        label_mode = "none"
    else:
        labels_dir = base / "gtFine" / split
        require_split_dirs("cityscapes", split, LAYOUT, labels_dir)
        train_ids = sorted(labels_dir.rglob("*_gtFine_labelTrainIds.png"))
        if label_mode == "auto":
            label_mode = "labelTrainIds" if train_ids and len(train_ids) >= len(images) else "labelIds"
        suffix = f"_gtFine_{label_mode}.png"
        masks = train_ids if label_mode == "labelTrainIds" else sorted(labels_dir.rglob("*" + suffix))
        samples, problems = pair_by_stem(
            images, masks, _frame_key("_leftImg8bit.png"), _frame_key(suffix), f"cityscapes {split} ({base})",
            allow_unpaired,
        )
    if label_mode == "labelTrainIds":
        table = label_lookup(256, {**{t: t for t in range(len(CLASSES))}, IGNORE_INDEX: IGNORE_INDEX})
        described = f"train ids 0..18 and {IGNORE_INDEX}"
    else:
        table = label_lookup(256, ID_TO_TRAIN_ID if label_mode == "labelIds" else {})
        described = "label ids 0..33"
    dataset = SegmentationDataset(
        "cityscapes", split, samples, CLASSES, table, PALETTE, transforms, described, problems
    )
    dataset.label_mode = label_mode
    for train_id, label_id in TRAIN_ID_TO_ID.items():  # predictions are saved as official label ids
        dataset.export_table[train_id] = label_id
    return dataset
