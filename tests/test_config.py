"""One config path: dataclass defaults < dataset recipe < TOML file < flags."""

from __future__ import annotations

import pickle

import pytest

from seg.cli import flag_message
from seg.config import SCRATCH_RECIPE, SCRATCH_RECIPES, ConfigError, TrainConfig, build_config, resolve_pretrained


def test_recipe_then_file_then_flags(tmp_path):
    ade = build_config({"dataset": "ade20k"})
    assert (ade.epochs, ade.base_size, ade.crop_size, ade.aux_weight, ade.total_batch) == (120, 520, 480, 0.5, 16)
    assert ade.backbone == "resnest101" and ade.pretrained == "auto"
    config = tmp_path / "run.toml"
    config.write_text('dataset = "cityscapes"\ncrop_size = 512\nlr = 0.02\n[published]\nmIoU = 80.42\n')
    cfg = build_config({"crop_size": 640, "lr": None}, config)
    assert cfg.dataset == "cityscapes" and cfg.base_size == 2048  # the recipe of the file's dataset
    assert cfg.crop_size == 640 and cfg.lr == 0.02  # the flag beats the file; an absent flag does not


def test_derived_values_scale_the_lr_with_the_total_batch():
    cfg = build_config({"dataset": "ade20k"}).resolved(train_size=20210, world_size=8)
    assert (cfg.batch_size, cfg.total_batch, cfg.lr) == (2, 16, 0.01)
    assert cfg.iters == 120 * (20210 // 8 // 2)
    small = build_config({"dataset": "ade20k", "batch_size": 2, "accum": 2}).resolved(20210, 1)
    assert small.total_batch == 4 and small.lr == pytest.approx(0.0025)


@pytest.mark.parametrize(
    "settings,setting,message",
    [
        ({"crop_size": 0}, "crop_size", "crop_size must be positive, got 0"),
        ({"crop_size": 10000}, "crop_size", "crop_size 10000 is larger than allowed (4096)"),
        ({"lr": -1.0}, "lr", "lr must be positive, got -1.0"),
        ({"amp": "fp8"}, "amp", "amp must be auto, bf16, fp16 or off, got 'fp8'"),
        ({"time_budget": 0.0}, "time_budget", "time_budget must be a positive number of minutes, got 0.0"),
        ({"warmup_iters": -1}, "warmup_iters", "warmup_iters must be >= 0, got -1"),
        ({"ohem_threshold": 1.5}, "ohem_threshold", "ohem_threshold must be in (0, 1], got 1.5"),
        ({"scale_range": (2.0, 1.0)}, "scale_range", "scale_range must be 0 < min <= max, got (2.0, 1.0)"),
    ],
)
def test_bad_values_name_the_setting(settings, setting, message):
    """The library names settings, never a command-line flag; a CLI words the error with its flag."""
    with pytest.raises(ConfigError) as caught:
        build_config(settings)
    assert caught.value.setting == setting and str(caught.value) == message and "--" not in message
    assert flag_message(caught.value) == "--" + setting.replace("_", "-") + message[len(setting):]


def test_flag_message_words_a_setting_as_its_flag():
    error = ConfigError("window_batch", "must be positive, got 0")
    assert (str(error), error.setting, error.problem) == ("window_batch must be positive, got 0", "window_batch",
                                                          "must be positive, got 0")
    assert flag_message(error) == "--window-batch must be positive, got 0"
    assert flag_message(error, {"window_batch": "--batch-size"}) == "--batch-size must be positive, got 0"
    whole = ConfigError("run.toml: not valid TOML (bad)")  # the one-argument form: no setting
    assert whole.setting is None and flag_message(whole, {"window_batch": "--batch-size"}) == str(whole)
    copied = pickle.loads(pickle.dumps(error))  # e.g. raised in a worker process
    assert (copied.setting, copied.problem, str(copied)) == (error.setting, error.problem, str(error))


def test_bad_files_are_named(tmp_path):
    """File-level errors name the file (no flag) and carry it as ``file``; they have no setting."""
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="missing.toml: file not found") as caught:
        build_config({}, missing)
    assert str(caught.value).startswith(str(missing)) and caught.value.file == missing
    broken = tmp_path / "broken.toml"
    broken.write_text("crop_size = [")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML") as caught:
        build_config({}, broken)
    assert str(caught.value).startswith(str(broken)) and caught.value.setting is None
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("crop = 3\n")
    with pytest.raises(ConfigError, match="unknown.toml: unknown setting 'crop'") as caught:
        build_config({}, unknown)
    assert caught.value.file == unknown and "--config" not in str(caught.value)


def test_defaults_are_the_dataclass():
    assert build_config({}).dataset == TrainConfig().dataset == "toy"


def test_random_init_takes_the_from_scratch_recipe(tmp_path):
    scratch = build_config({"dataset": "camvid", "pretrained": "none"})
    for key, value in {**SCRATCH_RECIPE, **SCRATCH_RECIPES["camvid"]}.items():
        assert getattr(scratch, key) == (tuple(value) if isinstance(value, list) else value), key
    assert resolve_pretrained(scratch) is None
    assert scratch.epochs == 60 and scratch.total_batch == 8  # the dataset recipe's other values stay
    # ImageNet weights keep the paper-style recipe.
    pretrained = build_config({"dataset": "camvid"})
    assert (pretrained.backbone, pretrained.head_lr_mult, pretrained.amp) == ("resnest50", 10.0, "off")
    assert resolve_pretrained(pretrained) == "resnest50"
    # A file and flags still win over the scratch layer; a named backbone is kept.
    config = tmp_path / "run.toml"
    config.write_text('dataset = "camvid"\npretrained = "none"\nhead_lr_mult = 4.0\n')
    cfg = build_config({"backbone": "resnet50", "warmup_iters": 0}, config)
    assert (cfg.head_lr_mult, cfg.warmup_iters, cfg.backbone, cfg.base_lr) == (4.0, 0, "resnet50",
                                                                               SCRATCH_RECIPE["base_lr"])
    # Other datasets take the generic layer; the toy recipe (written for random init) is untouched.
    assert build_config({"dataset": "ade20k", "pretrained": "none"}).head_lr_mult == 1.0
    toy = build_config({})
    assert (toy.base_lr, toy.head_lr_mult, toy.amp) == (0.08, 10.0, "off")


def test_a_budget_validates_five_times_unless_told():
    cfg = build_config({"dataset": "camvid", "pretrained": "none", "time_budget": 15.0, "iters": 400})
    resolved = cfg.resolved(train_size=367, world_size=1)
    assert resolved.eval_every == 80
    explicit = build_config({"dataset": "camvid", "time_budget": 15.0, "iters": 400, "eval_every": 100})
    assert explicit.resolved(367, 1).eval_every == 100
