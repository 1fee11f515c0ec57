"""Shared test fixtures: the real-sample folder and reproducible non-trivial BatchNorm statistics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

# ../shared beside the repository holds reference key lists and real dataset samples (never copied in here).
SHARED = Path(os.environ.get("SEG_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture
def shared() -> Callable[..., Path]:
    """shared("reference", "x.txt") -> the path under ../shared, skipping the test with the reason if absent."""

    def locate(*parts: str) -> Path:
        path = SHARED.joinpath(*parts)
        if not path.exists():
            pytest.skip(f"{path} is absent (the shared reference folder is not beside this checkout)")
        return path

    return locate


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN affine parameters, running statistics measured on a random batch, eval mode.

    Like a trained network (and unlike random running statistics, which blow logits up to the hundreds where
    fp32 rounding alone exceeds 1e-4), activations stay normalised; residual-branch gammas (``bn3``) are small.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                residual_end = name.endswith("bn3")
                module.weight.copy_(torch.rand(n, generator=generator) * (0.3 if residual_end else 1.0)
                                    + (0.0 if residual_end else 0.5))
                module.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.reset_running_stats()
                module.momentum = None  # cumulative average: running stats = this batch's statistics
                norms.append(module)
        model.train()
        model(torch.randn(4, 3, 64, 64, generator=generator))
    for module in norms:
        module.momentum = 0.1
    return model.eval()


@pytest.fixture
def randomize_batchnorm() -> Callable[..., torch.nn.Module]:
    """Give every BN random affine parameters and data-measured running statistics (returns the model in eval)."""
    return _randomize_batchnorm


TINY_TRAINING = ["--dataset", "toy", "--iters", "8", "--batch-size", "2", "--crop-size", "48", "--base-size", "64",
                 "--workers", "0", "--eval-every", "4", "--log-every", "1", "--seed", "3"]


@pytest.fixture(scope="session")
def tiny_training_run(tmp_path_factory):
    """A finished 8-iteration toy run (output folder, completed process), shared by the engine and CLI tests."""
    import subprocess
    import sys

    output = tmp_path_factory.mktemp("tiny_run")
    result = subprocess.run([sys.executable, "-m", "seg.train", *TINY_TRAINING, "--output-dir", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return output, result


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
