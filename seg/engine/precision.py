"""Numeric precision: the names users pass, what ``auto`` picks on this machine, and the CPU's matrix units.

``auto`` is bf16 where bf16 is both faster and safe: a CPU with bf16 matrix instructions (Intel AMX, or AVX-512
BF16 as on AMD Zen 4 and Intel Cooper Lake onwards), or a CUDA device that supports bf16 (Ampere onwards).
Elsewhere bf16 is emulated on the CPU (slower than fp32) and fp16 risks overflow, so ``auto`` is fp32 there.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Optional, Union

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def cpu_matrix_units() -> str:
    """The CPU's bf16 matrix hardware: ``"AMX"``, ``"AVX-512 BF16"`` or ``""`` (none)."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return "AVX-512 BF16"
    except (AttributeError, RuntimeError):  # an older or non-x86 build: ask the kernel instead
        flags = _cpu_flags()
        if "amx_bf16" in flags:
            return "AMX"
        if "avx512_bf16" in flags:
            return "AVX-512 BF16"
    return ""


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def describe_cpu() -> str:
    """The CPU's model name and vector/matrix ISA, for benchmark headers, e.g.
    ``"Intel(R) Xeon(R) Processor, AVX512, bf16 units: AMX"``."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return f"{name}, {capability or 'unknown ISA'}, bf16 units: {cpu_matrix_units() or 'none'}"


def resolve_precision(precision: str, device: Union[str, torch.device]) -> torch.dtype:
    """The dtype inference runs in for ``precision`` (one of :data:`PRECISIONS`) on ``device``.

    Raises ValueError for an unknown name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision != "auto":
        return DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_matrix_units():
        return torch.bfloat16
    return torch.float32


def autocast_dtype(amp: str, device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The autocast dtype of the training setting ``amp`` on ``device``: None (float32, no autocast) for ``off``,
    and for ``auto`` where :func:`resolve_precision` picks float32; else bfloat16 or float16.

    Raises :class:`~seg.config.ConfigError` (a ValueError) about ``amp`` for an unknown setting.
    """
    if amp == "off":
        return None
    if amp not in ("auto", "bf16", "fp16"):
        from seg.config import ConfigError  # the settings' error; precision itself needs nothing else of config

        raise ConfigError("amp", f"must be one of auto, bf16, fp16, off, got {amp!r}")
    dtype = resolve_precision(amp, device)
    return None if dtype == torch.float32 else dtype


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (None and float32 -> ``"fp32"``)."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    return "fp32"
