"""Every experiments/ config loads through the one config path and is listed in experiments/README.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from seg.config import build_config, tomllib
from seg.models import list_backbones

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIGS = sorted(EXPERIMENTS.glob("*.toml"))


def test_the_paper_rows_are_all_there():
    names = {path.stem for path in CONFIGS}
    for dataset, backbones in {"ade20k": ["resnet50", "resnet101", "resnest50", "resnest101", "resnest200",
                                          "resnest269"],
                               "cityscapes": ["resnet50", "resnet101", "resnest50", "resnest101"]}.items():
        for backbone in backbones:
            assert f"{dataset}_deeplabv3_{backbone}" in names
    assert any(name.startswith("camvid_") for name in names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_is_documented(path):
    cfg = build_config({}, path)
    assert cfg.backbone in list_backbones() and path.stem.startswith(cfg.dataset)
    assert f"`{path.name}`" in (EXPERIMENTS / "README.md").read_text()
    published = tomllib.loads(path.read_text()).get("published", {})
    if cfg.dataset != "camvid":
        assert 0 < published["mIoU"] < 100
