"""What ``--deterministic`` switches on: the same seed on the same machine and software gives the same weights.

On the CPU every kernel ``seg`` trains with is already deterministic, so the switch changes no result there
(tested bitwise in ``tests/engine/test_determinism.py``). On CUDA it takes four settings, all made by
:func:`enable_determinism`:

- ``torch.use_deterministic_algorithms(True)``: deterministic implementations wherever PyTorch has one (cuDNN
  convolutions among them). On CUDA ``warn_only=True``, because two operations of DeepLabV3 training have no
  deterministic CUDA implementation and would otherwise stop the run: the backward of bilinear
  ``F.interpolate`` (``upsample_bilinear2d_backward``, the logits upsampled to the input size), and
  ``cross_entropy``'s ``nll_loss2d`` (CUDA ``NLLLoss``). They warn once and keep their atomic additions, so
  weights can still differ in the last bits between two CUDA runs.
- ``torch.backends.cudnn.benchmark = False``: benchmarking times the candidate convolution algorithms and can pick
  a different (equally deterministic, but numerically different) one in each run.
- ``torch.backends.cudnn.deterministic = True``: the same for code paths that read this older flag directly.
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set): without it cuBLAS (CUDA >= 10.2) may split a product
  differently from run to run; PyTorch reads it when it first sizes cuBLAS's workspace, so this must run before
  the first CUDA matrix product, i.e. before the model's first step.
"""

from __future__ import annotations

import os
from typing import Union

import torch

# cuBLAS's documented deterministic workspace settings are ":4096:8" (more memory, faster) and ":16:8".
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def enable_determinism(device: Union[str, torch.device]) -> None:
    """Switch this process to deterministic algorithms for training on ``device`` (see the module docstring).

    Process-wide and not undone: call it once, before building CUDA tensors and before the first matrix product.
    On CUDA the operations without a deterministic implementation warn instead of failing.
    """
    device_type = torch.device(device).type
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=device_type == "cuda")
