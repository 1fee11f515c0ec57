"""``ModelCard``: what a trained model is, in one typed, versioned record.

A card holds everything needed to rebuild and use a model: the builder arguments of its segmentor and backbone,
its classes and palette, the normalisation of its inputs, the sizes it was trained at, the scales of its
multi-scale evaluation, the dataset, its ignore value and label mode, the ``seg`` version that wrote it and, when
known, its metrics. The trainer writes one into every checkpoint; checkpoint loading, :class:`~seg.Segmenter`,
``seg.eval``, ``seg.export`` and shared Hub folders (``config.json``) read only the card.

    >>> card = ModelCard.from_dict(json.loads(Path("config.json").read_text()), source="config.json")
    >>> card.num_classes, card.base_size
    (150, 520)

The dictionary form (:meth:`ModelCard.to_dict`) is plain JSON: no pickle, and every field is checked when read,
so a malformed file fails with one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from seg import __version__
from seg.data.base import IGNORE_INDEX
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Bumped when a field changes meaning or a required one is added; readers refuse cards from a newer version.
CARD_VERSION = 1

# How mIoU is averaged (REFERENCE section 3): mmsegmentation's mean over the classes with a non-empty union,
# the number every metric in a card carries.
MIOU_CONVENTION = "mean over classes with a non-empty union (mmsegmentation)"

# What the label mode of a dataset without one means: masks hold train ids 0..num_classes-1 and IGNORE_INDEX.
TRAIN_IDS = "train_ids"


class ModelCardError(ValueError):
    """A model card is malformed or does not fit its weights; the message names the file and the field."""


@dataclass(frozen=True)
class CardMetrics:
    """One measurement of a model: ``mIoU`` and ``pixAcc`` in [0, 1] on ``dataset``'s ``split``.

    ``inference`` is ``single-scale`` or ``ms+flip``; ``convention`` says how the mIoU averages classes.
    """

    dataset: str
    split: str
    mIoU: float
    pixAcc: float
    inference: str = "single-scale"
    precision: str = "fp32"
    convention: str = MIOU_CONVENTION
    iteration: Optional[int] = None


@dataclass(frozen=True)
class ModelCard:
    """A trained model's description (module docstring). Immutable: derive variants with :meth:`replace`.

    Attributes:
        segmentor, backbone, output_stride, aux, backbone_args: ``build_segmentor(segmentor, backbone=...,
            num_classes=..., output_stride=..., aux=..., **backbone_args)`` rebuilds the network.
        num_classes, classes, palette: class names in train-id order and their (r, g, b) colours.
        mean, std: normalisation of 0..1 RGB inputs.
        dataset, crop_size, base_size: what it was trained on and at (the long side ``base_size`` is the scale
            inference runs at by default; None: the image's own size).
        test_scales: the dataset's multi-scale evaluation scales (multiples of ``base_size``).
        ignore_index, label_mode: the label value that is not scored, and how masks encode classes
            (``train_ids``, or Cityscapes' ``labelIds`` / ``labelTrainIds``).
        license: the licence of the weights (an SPDX id, or ``other``).
        seg_version, card_version: who wrote the card and in which schema.
        metrics: measurements, newest last.
    """

    segmentor: str
    backbone: str
    num_classes: int
    classes: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    output_stride: int = 8
    aux: bool = True
    backbone_args: Mapping[str, Any] = field(default_factory=dict)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    dataset: str = ""
    crop_size: int = 512
    base_size: Optional[int] = None
    test_scales: Tuple[float, ...] = (1.0,)
    ignore_index: int = IGNORE_INDEX
    label_mode: str = TRAIN_IDS
    license: str = "other"
    seg_version: str = __version__
    metrics: Tuple[CardMetrics, ...] = ()
    card_version: int = CARD_VERSION

    def __post_init__(self) -> None:
        # Normalise containers so that cards built from lists, arrays or JSON compare equal and stay immutable.
        set_ = object.__setattr__
        set_(self, "classes", tuple(str(name) for name in self.classes))
        set_(self, "palette", tuple(tuple(int(v) for v in colour) for colour in self.palette))
        set_(self, "mean", tuple(float(v) for v in self.mean))
        set_(self, "std", tuple(float(v) for v in self.std))
        set_(self, "test_scales", tuple(float(v) for v in self.test_scales))
        set_(self, "backbone_args", dict(self.backbone_args))
        set_(self, "metrics", tuple(m if isinstance(m, CardMetrics) else CardMetrics(**m) for m in self.metrics))
        _check(self)

    # --- building ---------------------------------------------------------------------------------------

    @classmethod
    def for_dataset(cls, dataset, *, segmentor: str, backbone: str, output_stride: int, aux: bool,
                    crop_size: int, base_size: Optional[int], test_scales: Sequence[float],
                    **fields: Any) -> "ModelCard":
        """The card of a model trained on ``dataset`` (a :class:`~seg.data.SegmentationDataset`): its name,
        classes, palette, ignore value and label mode come from it."""
        return cls(segmentor=segmentor, backbone=backbone, num_classes=dataset.num_classes,
                   classes=dataset.classes, palette=[tuple(c) for c in dataset.palette.tolist()],
                   output_stride=output_stride, aux=aux, dataset=dataset.name, crop_size=crop_size,
                   base_size=base_size, test_scales=test_scales, ignore_index=dataset.ignore_index,
                   label_mode=getattr(dataset, "label_mode", TRAIN_IDS), **fields)

    def replace(self, **changes: Any) -> "ModelCard":
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def with_metrics(self, metrics: CardMetrics) -> "ModelCard":
        """A copy whose metrics end with ``metrics`` (replacing an earlier one of the same split, dataset and
        inference, so a card keeps one number per setting)."""
        kept = tuple(m for m in self.metrics if (m.dataset, m.split, m.inference, m.precision)
                     != (metrics.dataset, metrics.split, metrics.inference, metrics.precision))
        return self.replace(metrics=kept + (metrics,))

    def builder_arguments(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`seg.models.build_segmentor` that rebuild the network."""
        return {"name": self.segmentor, "backbone": self.backbone, "num_classes": self.num_classes,
                "output_stride": self.output_stride, "aux": self.aux, **self.backbone_args}

    # --- the dictionary form ----------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON values (lists, numbers, strings), as written into checkpoints and ``config.json``."""
        out = dataclasses.asdict(self)
        for key in ("classes", "palette", "mean", "std", "test_scales"):
            out[key] = [list(v) if isinstance(v, tuple) else v for v in out[key]]
        out["metrics"] = list(out["metrics"])
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "model card") -> "ModelCard":
        """The card in ``data`` (from :meth:`to_dict`, JSON or a checkpoint); ModelCardError naming ``source``
        and the field when a key is missing or unknown, a value has the wrong type, or the card is newer than
        this ``seg``."""
        if not isinstance(data, Mapping):
            raise ModelCardError(f"{source}: expected a JSON object (the model card), got {type(data).__name__}")
        version = data.get("card_version", CARD_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > CARD_VERSION:
            raise ModelCardError(f"{source}: card_version {version!r} is newer than this seg ({__version__}) reads "
                                 f"(up to {CARD_VERSION}); upgrade seg")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ModelCardError(f"{source}: unknown key(s) {', '.join(unknown)}; a model card has "
                                 f"{', '.join(known)}")
        required = [name for name, f in known.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ModelCardError(f"{source}: missing key(s) {', '.join(missing)}")
        values = dict(data)
        try:
            _check_types(values)
            if "metrics" in values:
                values["metrics"] = [CardMetrics(**m) for m in values["metrics"]]
            return cls(**values)
        except ModelCardError as error:
            raise ModelCardError(f"{source}: {error}") from None
        except (TypeError, ValueError) as error:
            raise ModelCardError(f"{source}: {error}") from None


def _check_types(values: Dict[str, Any]) -> None:
    """The JSON types of the fields, before the dataclass converts them."""
    def expect(key: str, ok: bool, what: str) -> None:
        if key in values and not ok:
            raise ModelCardError(f"{key} must be {what}, got {values[key]!r}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in ("segmentor", "backbone", "dataset", "label_mode", "license", "seg_version"):
        expect(key, isinstance(values.get(key), str), "a string")
    for key in ("num_classes", "output_stride", "crop_size", "ignore_index"):
        expect(key, integer(values.get(key)), "an integer")
    expect("base_size", values.get("base_size") is None or integer(values.get("base_size")), "an integer or null")
    expect("aux", isinstance(values.get("aux"), bool), "true or false")
    expect("classes", isinstance(values.get("classes"), list) and all(isinstance(c, str) for c in values.get(
        "classes", [])), "a list of class names")
    expect("palette", isinstance(values.get("palette"), list) and all(
        isinstance(c, list) and len(c) == 3 and all(integer(v) for v in c) for c in values.get("palette", [])),
        "a list of [r, g, b] integer triples")
    for key in ("mean", "std"):
        expect(key, isinstance(values.get(key), list) and len(values.get(key)) == 3
               and all(number(v) for v in values.get(key, [])), "three numbers")
    expect("test_scales", isinstance(values.get("test_scales"), list)
           and all(number(v) for v in values.get("test_scales", [])), "a list of numbers")
    expect("backbone_args", isinstance(values.get("backbone_args"), dict), "an object of builder arguments")
    expect("metrics", isinstance(values.get("metrics"), list) and all(isinstance(m, dict) for m in values.get(
        "metrics", [])), "a list of objects")


def _check(card: ModelCard) -> None:
    """Values no model could have: raises ModelCardError naming the field."""
    from seg.models import list_backbones, list_segmentors  # the registries; imported late to keep this light

    def fail(message: str) -> None:
        raise ModelCardError(message)

    if card.segmentor not in list_segmentors():
        fail(f"segmentor {card.segmentor!r} is unknown; choose one of: {', '.join(list_segmentors())}")
    if card.backbone not in list_backbones():
        fail(f"backbone {card.backbone!r} is unknown; choose one of: {', '.join(list_backbones())}")
    if card.num_classes < 1:
        fail(f"num_classes must be positive, got {card.num_classes}")
    if len(card.classes) != card.num_classes:
        fail(f"classes lists {len(card.classes)} names but num_classes is {card.num_classes}")
    if len(card.palette) != card.num_classes:
        fail(f"palette has {len(card.palette)} colours but num_classes is {card.num_classes}")
    if any(len(colour) != 3 or not all(0 <= v <= 255 for v in colour) for colour in card.palette):
        fail("palette colours must be [r, g, b] with values 0..255")
    if card.output_stride not in (8, 16, 32):
        fail(f"output_stride must be 8, 16 or 32, got {card.output_stride}")
    if len(card.mean) != 3 or len(card.std) != 3 or any(not (s > 0 and math.isfinite(s)) for s in card.std):
        fail(f"mean and std must be three numbers, std positive; got {list(card.mean)}, {list(card.std)}")
    if card.crop_size < 1:
        fail(f"crop_size must be positive, got {card.crop_size}")
    if card.base_size is not None and card.base_size < 1:
        fail(f"base_size must be positive or null, got {card.base_size}")
    if not card.test_scales or any(not (s > 0 and math.isfinite(s)) for s in card.test_scales):
        fail(f"test_scales must be positive numbers, got {list(card.test_scales)}")
    if not 0 <= card.ignore_index <= 255 or card.ignore_index < card.num_classes:
        fail(f"ignore_index must be in {card.num_classes}..255, got {card.ignore_index}")
    for key in card.backbone_args:
        if key in ("name", "backbone", "num_classes", "output_stride", "aux", "pretrained", "pretrained_backbone"):
            fail(f"backbone_args may not set {key!r}; it is a field of the card")
