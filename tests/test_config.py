"""One config path: dataclass defaults < dataset recipe < TOML file < flags."""

from __future__ import annotations

import pytest

from seg.config import ConfigError, TrainConfig, build_config


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
    "flags,message",
    [
        ({"crop_size": 0}, "--crop-size must be positive"),
        ({"crop_size": 10000}, "--crop-size 10000 is larger than allowed"),
        ({"lr": -1.0}, "--lr must be positive"),
        ({"amp": "fp8"}, "--amp must be bf16, fp16 or off"),
    ],
)
def test_bad_values_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(flags)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml: file not found"):
        build_config({}, tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("crop_size = [")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        build_config({}, broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("crop = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'crop'"):
        build_config({}, unknown)


def test_defaults_are_the_dataclass():
    assert build_config({}).dataset == TrainConfig().dataset == "toy"
