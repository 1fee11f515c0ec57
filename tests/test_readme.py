"""The README's promises: the backbone table is what the code computes, and Quick start has exactly the two
command lines (train on the toy data, run the tests) that CI reads."""

from __future__ import annotations

import re
from pathlib import Path

from seg.models.complexity import backbone_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_command(marker: str) -> list:
    block = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```\n<!-- /{marker} -->", README, re.S)
    assert block, f"README has no {marker} block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_backbone_table_matches_the_models():
    assert backbone_table() in README


def test_quick_start_has_one_train_and_one_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert quick_start.count("```bash") == 2
    train, tests = fenced_command("train-command"), fenced_command("test-command")
    assert len(train) == 1 and "pip install -e ." in train[0] and train[0].endswith("-m seg.train")
    assert len(tests) == 1 and '.[test]' in tests[0] and "pytest" in tests[0]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and "README.md" in ci
