"""Training configuration: one path from defaults to the values a run uses.

Precedence, lowest first: the dataclass defaults, the dataset's recipe (``RECIPES``), an optional TOML file
(``--config experiments/<name>.toml``), then command-line flags. The resolved config is saved in every
checkpoint and printed at start.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the setting or file and what was expected.

    ``ConfigError(setting, problem)``: a setting's value is unusable; ``str()`` is ``f"{setting} {problem}"``, e.g.
    ``"crop_size must be positive, got 0"`` (a command line words it with its flag: :func:`seg.cli.flag_message`).
    ``ConfigError(message)``: a file- or key-level error (a missing or invalid TOML file, an unknown key), with
    ``setting`` None. ``file`` is the config file the error is about, if any.
    """

    def __init__(self, setting: Optional[str], problem: Optional[str] = None, *, file: Optional[Path] = None) -> None:
        if problem is None:  # the one-argument form: a whole message
            setting, problem = None, setting
        self.setting = setting
        self.problem = problem
        self.file = file
        super().__init__(f"{setting} {problem}" if setting is not None else problem)

    def __reduce__(self):  # pickled with its setting and file (e.g. from a worker process)
        return _rebuild_config_error, (self.setting, self.problem, self.file)


def _rebuild_config_error(setting: Optional[str], problem: Optional[str], file: Optional[Path]) -> ConfigError:
    return ConfigError(setting, problem, file=file)


@dataclass
class TrainConfig:
    """Everything a training run needs. ``None`` means "derived" (see :meth:`resolve`)."""

    dataset: str = "toy"
    backbone: str = "resnest101"
    data_root: Optional[str] = None
    output_stride: int = 8
    # Length: epochs or optimizer steps (``iters`` wins when both are set).
    epochs: Optional[int] = None
    iters: Optional[int] = None
    # Batch: ``total_batch`` images per optimizer step = batch_size x processes x accum.
    total_batch: int = 16
    batch_size: Optional[int] = None
    accum: int = 1
    # Optimiser: SGD, poly schedule per iteration; lr scales linearly with the total batch (base_lr at 16).
    base_lr: float = 0.01
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    warmup_iters: int = 0
    # A wall-clock budget in minutes, validation included: a short throughput probe fixes ``iters`` (stored in the
    # checkpoint, so a resumed run keeps its schedule). Overrides ``iters``/``epochs``.
    time_budget: Optional[float] = None
    # Loss: per-class weights (None, "auto" = median frequency balancing from the train masks, or a file of
    # numbers), and online hard example mining of the main head's pixels (mmsegmentation's OHEMPixelSampler).
    class_weights: Optional[str] = None
    class_weights_power: float = 1.0  # weights ** power: 0.5 tempers median frequency weights
    ohem: bool = False
    ohem_threshold: float = 0.7
    ohem_min_kept: int = 100000
    # Model and data.
    crop_size: int = 480
    base_size: int = 520
    scale_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    # An unreadable training file stops the run (naming it) unless this is set: then it is logged, counted and
    # replaced by the next readable sample.
    skip_bad_samples: bool = False
    aux: bool = True
    aux_weight: float = 0.5
    pretrained: str = "auto"
    # Runtime.
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    workers: int = 4
    seed: int = 0
    device: str = "auto"
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    eval_every: Optional[int] = None
    val_limit: Optional[int] = None
    checkpoint_every: Optional[int] = None
    log_every: int = 10
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, train_size: int, world_size: int) -> "TrainConfig":
        """A copy with every derived value filled in, for a training set of ``train_size`` images."""
        cfg = dataclasses.replace(self)
        if cfg.batch_size is None:
            cfg.batch_size = max(1, cfg.total_batch // (world_size * cfg.accum))
        cfg.total_batch = cfg.batch_size * world_size * cfg.accum
        if cfg.lr is None:
            cfg.lr = cfg.base_lr * cfg.total_batch / 16
        iters_per_epoch = max(1, (train_size // world_size) // (cfg.batch_size * cfg.accum))
        if cfg.iters is None:
            cfg.iters = (cfg.epochs or 1) * iters_per_epoch
        cfg.epochs = math.ceil(cfg.iters / iters_per_epoch)
        if cfg.eval_every is None:
            if cfg.time_budget is not None:  # validations cost a budgeted run's steps: five, the last at the end
                cfg.eval_every = max(1, math.ceil(cfg.iters / 5))
            else:
                cfg.eval_every = max(1, min(cfg.iters, iters_per_epoch * max(1, cfg.epochs // 10)))
        if cfg.checkpoint_every is None:
            cfg.checkpoint_every = max(1, min(cfg.iters, 500, cfg.eval_every))
        if cfg.output_dir is None:
            cfg.output_dir = str(Path("outputs") / f"{cfg.dataset}_{cfg.backbone}")
        return cfg


# The recipes that produced the published numbers (REFERENCE section 2), and short ones for the small datasets.
RECIPES: Dict[str, Dict[str, Any]] = {
    # GluonCV's ADE20K recipe: total batch 16, lr 0.01, 120 epochs, base 520, crop 480, aux 0.5, head 10x.
    "ade20k": dict(epochs=120, base_size=520, crop_size=480),
    # GluonCV's Cityscapes recipe: 240 epochs, base 2048, crop 768.
    "cityscapes": dict(epochs=240, base_size=2048, crop_size=768),
    # CamVid (367 train images of 480x360): short, from ImageNet weights.
    "camvid": dict(epochs=60, base_size=480, crop_size=360, total_batch=8, backbone="resnest50"),
    # The built-in toy data: learnable from scratch in a couple of minutes on a CPU.
    "toy": dict(backbone="resnest14", pretrained="none", iters=160, total_batch=8, base_lr=0.08,
                base_size=128, crop_size=96, scale_range=(0.75, 1.5), photometric=False, workers=2,
                output_stride=8, aux_weight=0.4),
}

# From random init the recipes above (written for ImageNet weights) train badly: the heads' 10x lr and a low
# backbone lr leave the random backbone behind, and x0.5-2 rescaling plus photometric distortion is more
# augmentation than a short run can use. These layers replace them when the backbone starts from random weights
# (experiments/README.md has the measurements behind each value). A recipe written for random init (toy) is
# left as it is.
SCRATCH_RECIPE: Dict[str, Any] = dict(base_lr=0.04, head_lr_mult=1.0, warmup_iters=50, scale_range=(0.75, 1.5),
                                      photometric=False, amp="auto")
SCRATCH_RECIPES: Dict[str, Dict[str, Any]] = {
    # CamVid from scratch on a CPU: ResNeSt-26 on frames at 256x192, square crops of 192, output stride 16 (twice
    # the steps of stride 8 in a budget, and better for it).
    # Square roots of the median frequency weights: most of the full weights' mIoU for little pixel accuracy.
    "camvid": dict(base_size=256, crop_size=192, backbone="resnest26", output_stride=16, class_weights="auto",
                   class_weights_power=0.5),
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def starts_from_scratch(dataset: str, backbone: str, pretrained: str) -> bool:
    """Whether the backbone starts from random weights: ``pretrained`` none, or ``auto`` for a backbone (or the toy
    data) without published ImageNet weights."""
    from seg.models import PUBLISHED_WEIGHTS  # torch-heavy; only when a config is built

    if pretrained == "none":
        return True
    return pretrained == "auto" and (dataset == "toy" or backbone not in PUBLISHED_WEIGHTS)


def resolve_pretrained(cfg: "TrainConfig") -> Optional[str]:
    """The backbone's initial weights: a published name or a file, or None for random init."""
    if starts_from_scratch(cfg.dataset, cfg.backbone, cfg.pretrained):
        return None
    return cfg.backbone if cfg.pretrained == "auto" else cfg.pretrained


def _coerce(key: str, value: Any, origin: str, file: Optional[Path] = None) -> Any:
    """``value`` of setting ``key`` as the config holds it; errors start with ``origin`` (the file, or the layer)."""
    if key not in FIELDS or key == "extra":
        known = ", ".join(sorted(k for k in FIELDS if k != "extra"))
        raise ConfigError(f"{origin}: unknown setting {key!r}; known: {known}", file=file)
    default = FIELDS[key].default
    if key == "scale_range":
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise ConfigError(f"{origin}: scale_range must be two numbers, got {value!r}", file=file)
        return (float(value[0]), float(value[1]))
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"{origin}: {key} must be true or false, got {value!r}", file=file)
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def load_toml(path: Path) -> Dict[str, Any]:
    """The settings of a TOML config file (top-level keys, or a ``[train]`` table).

    Raises:
        ConfigError: with ``file`` set to ``path`` and the message starting with it: the file is missing, not
            valid TOML, or holds an unknown setting or a value of the wrong type.
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found", file=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML ({error})", file=path) from None
    data = data.get("train", data)
    data.pop("published", None)  # experiments/ files carry the paper's numbers beside the recipe
    return {key: _coerce(key, value, str(path), file=path) for key, value in data.items()}


def build_config(flags: Dict[str, Any], config_file: Optional[Path] = None) -> TrainConfig:
    """Defaults < the dataset's recipe < the TOML file < flags (``None`` flags are "not given")."""
    file_settings = load_toml(config_file) if config_file else {}
    given = {key: value for key, value in flags.items() if value is not None}
    dataset = given.get("dataset", file_settings.get("dataset", TrainConfig.dataset))
    recipe = RECIPES.get(dataset, {})
    layers = [(recipe, "recipe"), (file_settings, "config"), (given, "flag")]
    if recipe.get("pretrained", "auto") != "none":
        chosen = {**recipe, **file_settings, **given}
        if starts_from_scratch(dataset, chosen.get("backbone", TrainConfig.backbone),
                               chosen.get("pretrained", TrainConfig.pretrained)):
            layers.insert(1, ({**SCRATCH_RECIPE, **SCRATCH_RECIPES.get(dataset, {})}, "from-scratch recipe"))
    cfg = TrainConfig()
    for layer, origin in layers:
        for key, value in layer.items():
            setattr(cfg, key, _coerce(key, value, origin))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject values no run could use: :class:`ConfigError` naming the setting, its value and what was expected."""
    checks = [
        ("crop_size", cfg.crop_size > 0, f"must be positive, got {cfg.crop_size}"),
        ("crop_size", cfg.crop_size <= 4096, f"{cfg.crop_size} is larger than allowed (4096)"),
        ("base_size", cfg.base_size > 0, f"must be positive, got {cfg.base_size}"),
        ("batch_size", cfg.batch_size is None or cfg.batch_size > 0, f"must be positive, got {cfg.batch_size}"),
        ("accum", cfg.accum > 0, f"must be positive, got {cfg.accum}"),
        ("iters", cfg.iters is None or cfg.iters > 0, f"must be positive, got {cfg.iters}"),
        ("epochs", cfg.epochs is None or cfg.epochs > 0, f"must be positive, got {cfg.epochs}"),
        ("lr", cfg.lr is None or cfg.lr > 0, f"must be positive, got {cfg.lr}"),
        ("aux_weight", cfg.aux_weight >= 0, f"must be >= 0, got {cfg.aux_weight}"),
        ("amp", cfg.amp in ("off", "bf16", "fp16", "auto"), f"must be auto, bf16, fp16 or off, got {cfg.amp!r}"),
        ("warmup_iters", cfg.warmup_iters >= 0, f"must be >= 0, got {cfg.warmup_iters}"),
        ("time_budget", cfg.time_budget is None or (math.isfinite(cfg.time_budget) and cfg.time_budget > 0),
         f"must be a positive number of minutes, got {cfg.time_budget}"),
        ("ohem_threshold", 0 < cfg.ohem_threshold <= 1, f"must be in (0, 1], got {cfg.ohem_threshold}"),
        ("ohem_min_kept", cfg.ohem_min_kept >= 0, f"must be >= 0, got {cfg.ohem_min_kept}"),
        ("class_weights_power", math.isfinite(cfg.class_weights_power) and cfg.class_weights_power >= 0,
         f"must be >= 0, got {cfg.class_weights_power}"),
        ("output_stride", cfg.output_stride in (8, 16, 32), f"must be 8, 16 or 32, got {cfg.output_stride}"),
        ("workers", cfg.workers >= 0, f"must be >= 0, got {cfg.workers}"),
        ("val_limit", cfg.val_limit is None or cfg.val_limit > 0, f"must be positive, got {cfg.val_limit}"),
        ("scale_range", 0 < cfg.scale_range[0] <= cfg.scale_range[1],
         f"must be 0 < min <= max, got {cfg.scale_range}"),
    ]
    for setting, ok, problem in checks:
        if not ok:
            raise ConfigError(setting, problem)
