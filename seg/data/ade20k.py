"""ADE20K (SceneParsing, ADEChallengeData2016): 150 classes; stored 1..150 -> train ids 0..149, 0 (other) -> ignore."""

from __future__ import annotations

from pathlib import Path

from .base import (
    IGNORE_INDEX,
    SegmentationDataset,
    check_split,
    label_lookup,
    pair_by_stem,
    require_split_dirs,
    resolve_root,
)
from .io import list_files
from .registry import DATASETS

LAYOUT = "ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}"
FOLDERS = {"train": "training", "val": "validation"}

# objectInfo150.csv of the official development kit, in index order (synonyms separated by ";").
CLASSES = (
    'wall', 'building;edifice', 'sky', 'floor;flooring', 'tree', 'ceiling', 'road;route', 'bed',
    'windowpane;window', 'grass', 'cabinet', 'sidewalk;pavement', 'person;individual;someone;somebody;mortal;soul',
    'earth;ground', 'door;double;door', 'table', 'mountain;mount', 'plant;flora;plant;life',
    'curtain;drape;drapery;mantle;pall', 'chair', 'car;auto;automobile;machine;motorcar', 'water',
    'painting;picture', 'sofa;couch;lounge', 'shelf', 'house', 'sea', 'mirror', 'rug;carpet;carpeting', 'field',
    'armchair', 'seat', 'fence;fencing', 'desk', 'rock;stone', 'wardrobe;closet;press', 'lamp',
    'bathtub;bathing;tub;bath;tub', 'railing;rail', 'cushion', 'base;pedestal;stand', 'box', 'column;pillar',
    'signboard;sign', 'chest;of;drawers;chest;bureau;dresser', 'counter', 'sand', 'sink', 'skyscraper',
    'fireplace;hearth;open;fireplace', 'refrigerator;icebox', 'grandstand;covered;stand', 'path', 'stairs;steps',
    'runway', 'case;display;case;showcase;vitrine', 'pool;table;billiard;table;snooker;table', 'pillow',
    'screen;door;screen', 'stairway;staircase', 'river', 'bridge;span', 'bookcase', 'blind;screen',
    'coffee;table;cocktail;table', 'toilet;can;commode;crapper;pot;potty;stool;throne', 'flower', 'book', 'hill',
    'bench', 'countertop', 'stove;kitchen;stove;range;kitchen;range;cooking;stove', 'palm;palm;tree',
    'kitchen;island',
    'computer;computing;machine;computing;device;data;processor;electronic;computer;information;processing;system',
    'swivel;chair', 'boat', 'bar', 'arcade;machine', 'hovel;hut;hutch;shack;shanty',
    'bus;autobus;coach;charabanc;double-decker;jitney;motorbus;motorcoach;omnibus;passenger;vehicle', 'towel',
    'light;light;source', 'truck;motortruck', 'tower', 'chandelier;pendant;pendent', 'awning;sunshade;sunblind',
    'streetlight;street;lamp', 'booth;cubicle;stall;kiosk',
    'television;television;receiver;television;set;tv;tv;set;idiot;box;boob;tube;telly;goggle;box',
    'airplane;aeroplane;plane', 'dirt;track', 'apparel;wearing;apparel;dress;clothes', 'pole', 'land;ground;soil',
    'bannister;banister;balustrade;balusters;handrail', 'escalator;moving;staircase;moving;stairway',
    'ottoman;pouf;pouffe;puff;hassock', 'bottle', 'buffet;counter;sideboard',
    'poster;posting;placard;notice;bill;card', 'stage', 'van', 'ship', 'fountain',
    'conveyer;belt;conveyor;belt;conveyer;conveyor;transporter', 'canopy',
    'washer;automatic;washer;washing;machine', 'plaything;toy', 'swimming;pool;swimming;bath;natatorium', 'stool',
    'barrel;cask', 'basket;handbasket', 'waterfall;falls', 'tent;collapsible;shelter', 'bag', 'minibike;motorbike',
    'cradle', 'oven', 'ball', 'food;solid;food', 'step;stair', 'tank;storage;tank',
    'trade;name;brand;name;brand;marque', 'microwave;microwave;oven', 'pot;flowerpot',
    'animal;animate;being;beast;brute;creature;fauna', 'bicycle;bike;wheel;cycle', 'lake',
    'dishwasher;dish;washer;dishwashing;machine', 'screen;silver;screen;projection;screen', 'blanket;cover',
    'sculpture', 'hood;exhaust;hood', 'sconce', 'vase', 'traffic;light;traffic;signal;stoplight', 'tray',
    'ashcan;trash;can;garbage;can;wastebin;ash;bin;ash-bin;ashbin;dustbin;trash;barrel;trash;bin', 'fan',
    'pier;wharf;wharfage;dock', 'crt;screen', 'plate', 'monitor;monitoring;device', 'bulletin;board;notice;board',
    'shower', 'radiator', 'glass;drinking;glass', 'clock', 'flag',
)


def _package_root(root: Path) -> Path:
    """Accept the folder holding ADEChallengeData2016/ or that folder itself."""
    return root if (root / "images").is_dir() and (root / "annotations").is_dir() else root / "ADEChallengeData2016"


@DATASETS.register
def ade20k(split: str = "train", root=None, transforms=None, allow_unpaired: bool = False) -> SegmentationDataset:
    """ADE20K scene parsing: ``train`` (20,210 images) and ``val`` (2,000)."""
    check_split(split, tuple(FOLDERS))
    package = _package_root(resolve_root("ade20k", root, LAYOUT))
    images_dir = package / "images" / FOLDERS[split]
    masks_dir = package / "annotations" / FOLDERS[split]
    require_split_dirs("ade20k", split, LAYOUT, images_dir, masks_dir)
    samples, problems = pair_by_stem(
        list_files(images_dir, (".jpg", ".jpeg")), list_files(masks_dir, (".png",)),
        lambda p: p.stem, lambda p: p.stem, f"ade20k {split} ({package})", allow_unpaired,
    )
    table = label_lookup(256, {0: IGNORE_INDEX, **{value: value - 1 for value in range(1, 151)}})
    dataset = SegmentationDataset(
        "ade20k", split, samples, CLASSES, table, transforms=transforms,
        describe_labels="0 (other, ignored) and 1..150", problems=problems,
    )
    dataset.export_table[:150] += 1  # predictions are saved as the benchmark's 1..150
    return dataset

