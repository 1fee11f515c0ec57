"""Dilated convolutions that take a fast, exact path in bf16 and fp16 on the CPU.

oneDNN's reduced-precision kernels for dilated convolutions with implicit zero padding can be very slow. On an
Intel Xeon with AMX (bench/RESULTS.md), the ASPP's 3x3 convolutions 2048 -> 256 at rates 12/24/36 on a 64x64
map take 130/212/318 ms in bf16 with implicit padding, 30/46/56 ms with the padding applied first, and 104/78/55 ms
in fp32; the backbone's dilation-2 and -4 convolutions are faster with implicit padding (2.0 vs 2.4 ms, 8.3 vs
12.8 ms). So the choice depends on the CPU, the shape and the dtype, and :class:`Conv2d` makes it by measuring.
Two rewrites, both exact (the convolution computes the same sums):

- **Taps that only ever see padding are dropped.** A tap of a "same" convolution at offset ``j * dilation`` reads
  input only where ``|j * dilation| < size``; the others multiply zeros. A 3x3 convolution at rate 36 on a 32x32
  map is its centre 1x1 tap (small maps are common: multi-scale inference at scale 0.5, small images).
- **Explicit padding**: ``F.pad`` then the convolution with padding 0, when timing says it is faster. It is
  measured once per convolution shape, dtype, memory format and input size (the first time they are met, batch 1,
  the better of three runs each, explicit chosen only when 10 % faster), at most
  ``MEASURED_SIZES_PER_SHAPE`` sizes per shape; other sizes reuse the nearest measured size's choice.

In float32, on CUDA, under autograd-free tracing, compilation, export or a dispatch mode (the FLOP counter), and
for undilated convolutions, this is ``nn.Conv2d`` exactly: oneDNN's fp32 kernels skip padded taps themselves (the
explicit padding was 2.3x slower there), cuDNN picks its own algorithms, and exported graphs stay standard.
With ``torch.use_deterministic_algorithms(True)`` (``seg.train --deterministic``) nothing is timed and the padding
stays implicit, so two runs compute the same bits. :func:`set_padding_policy` forces one path (tests, and the
benchmark's record of the lever).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

REDUCED_PRECISION = (torch.bfloat16, torch.float16)
# Sizes measured per convolution shape before the nearest measured size's choice is reused (bounds the one-off
# cost for inputs of ever-new sizes, e.g. whole-image prediction of arbitrary photos).
MEASURED_SIZES_PER_SHAPE = 4
# Explicit padding must beat the standard kernel by this factor to be chosen (ties keep the standard path).
EXPLICIT_PADDING_MARGIN = 0.9
POLICIES = ("measure", "implicit", "explicit")

_policy = "measure"
_lock = threading.Lock()
_choices: Dict[tuple, bool] = {}  # (shape key, height, width) -> explicit padding is faster
_measured_sizes: Dict[tuple, List[Tuple[int, int]]] = {}  # shape key -> the sizes measured for it


def set_padding_policy(policy: str) -> None:
    """``measure`` (default): time both paths per shape; ``implicit`` / ``explicit``: always that path."""
    global _policy
    if policy not in POLICIES:
        raise ValueError(f"padding policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    _policy = policy


def padding_choices() -> Dict[tuple, bool]:
    """The measured choices so far: ((dtype, channels in, channels out, kernel, dilation, groups, stride, padding,
    channels_last), height, width) -> True where explicit padding was faster."""
    with _lock:
        return dict(_choices)


def clear_padding_choices() -> None:
    with _lock:
        _choices.clear()
        _measured_sizes.clear()


def instrumented() -> bool:
    """True while the graph is traced, compiled or exported, or a dispatch mode (e.g. FlopCounterMode) watches the
    operators: they must then see the standard convolution."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling() or exporting()
            or torch._C._len_torch_dispatch_stack() > 0)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` computes in: autocast's on the CPU when it is on, else ``x``'s own."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


class Plan(NamedTuple):
    """How to run one convolution: the kept taps (rows, columns of the kernel), the padding, and whether the
    padding is applied to the input first."""

    rows: slice
    columns: slice
    padding: Tuple[int, int]
    explicit: bool


def _kept_taps(kernel: int, dilation: int, padding: int, size: int) -> Tuple[slice, int]:
    """(kernel slice, padding) along one axis of a stride-1 "same" convolution: taps whose offset is at least the
    input size read only padding."""
    half = kernel // 2
    if kernel % 2 == 0 or padding != dilation * half:
        return slice(0, kernel), padding
    reach = min(half, (size - 1) // dilation)
    return slice(half - reach, half + reach + 1), reach * dilation


def _time(run) -> float:
    run()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _explicit_is_faster(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, conv: nn.Conv2d,
                        padding: Tuple[int, int]) -> bool:
    """Time both paths once on one image of ``x``'s size and layout (no autograd, autocast off)."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        image = x[:1].detach().to(dtype)
        weight = weight.detach().to(dtype)
        ph, pw = padding
        implicit = _time(lambda: F.conv2d(image, weight, None, conv.stride, padding, conv.dilation, conv.groups))
        explicit = _time(lambda: F.conv2d(F.pad(image, (pw, pw, ph, ph)), weight, None, conv.stride, 0,
                                          conv.dilation, conv.groups))
    return explicit < EXPLICIT_PADDING_MARGIN * implicit


def _choose_explicit(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, conv: nn.Conv2d,
                     padding: Tuple[int, int]) -> bool:
    if _policy != "measure":
        return _policy == "explicit"
    if torch.are_deterministic_algorithms_enabled():
        return False  # a choice by timing could differ between two runs, and so could their last bits
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    shape = (dtype, conv.in_channels, conv.out_channels, tuple(weight.shape[2:]), tuple(conv.dilation), conv.groups,
             tuple(conv.stride), padding, channels_last)
    size = (x.shape[2], x.shape[3])
    with _lock:
        if (shape, *size) in _choices:
            return _choices[(shape, *size)]
        measured = _measured_sizes.setdefault(shape, [])
        if len(measured) >= MEASURED_SIZES_PER_SHAPE:
            area = math.log(size[0] * size[1])
            nearest = min(measured, key=lambda s: abs(math.log(s[0] * s[1]) - area))
            return _choices[(shape, *nearest)]
        # Measured under the lock: two threads meeting a new shape at once would time each other.
        choice = _explicit_is_faster(x, weight, dtype, conv, padding)
        measured.append(size)
        _choices[(shape, *size)] = choice
        return choice


def plan_convolution(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> Optional[Plan]:
    """The fast exact path for ``conv`` on ``x``, or None for the standard one (see the module docstring)."""
    if (x.device.type != "cpu" or x.dim() != 4 or max(conv.dilation) == 1 or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str) or max(conv.padding) == 0 or tuple(conv.stride) != (1, 1)
            or compute_dtype(x) not in REDUCED_PRECISION or instrumented()):
        return None
    rows, pad_h = _kept_taps(weight.shape[2], conv.dilation[0], conv.padding[0], x.shape[2])
    columns, pad_w = _kept_taps(weight.shape[3], conv.dilation[1], conv.padding[1], x.shape[3])
    padding = (pad_h, pad_w)
    kernel = (rows.stop - rows.start, columns.stop - columns.start)
    explicit = max(padding) > 0 and _choose_explicit(x, weight[:, :, rows, columns], compute_dtype(x), conv, padding)
    if kernel == tuple(weight.shape[2:]) and not explicit:
        return None
    return Plan(rows, columns, padding, explicit)


def apply_plan(plan: Plan, x: torch.Tensor, weight: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """(input, weight, padding) to convolve under ``plan``: the input padded when the plan says so (cast to the
    compute dtype first under autocast, so the padded copy is half the size)."""
    weight = weight[:, :, plan.rows, plan.columns]
    if not plan.explicit:
        return x, weight, plan.padding
    dtype = compute_dtype(x)
    ph, pw = plan.padding
    return F.pad(x.to(dtype), (pw, pw, ph, ph)), weight, (0, 0)


class _PaddedForwardConvolution(torch.autograd.Function):
    """A convolution whose forward pass pads explicitly and whose backward pass is the standard implicit-padding
    convolution backward on the unpadded input. Training needs both: the backward of the padded convolution (a
    gradient over the padded map, then sliced) was 2.9x slower than the standard backward for the ASPP's rate 36
    on an AMX Xeon (1200 vs 415 ms per batch of two 64x64 maps), while its forward was 5.9x faster (145 vs 854 ms).
    It saves the unpadded input, not the padded copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups, bias is not None)
        ph, pw = padding
        return F.conv2d(F.pad(x, (pw, pw, ph, ph)), weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.geometry
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, x, weight, [weight.shape[0]] if has_bias else None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias])
        return grad_input, grad_weight, grad_bias, None, None, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that runs dilated convolutions in bf16/fp16 on the CPU with
    the padded-only taps dropped and, where measured faster, the padding applied first (in training, in the
    forward pass only). Exact: the same sums."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        plan = plan_convolution(self, input, weight)
        if plan is None:
            return super()._conv_forward(input, weight, bias)
        if plan.explicit and torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad):
            dtype = compute_dtype(input)  # autocast's casts, made here, so autograd sees them
            weight = weight[:, :, plan.rows, plan.columns].to(dtype)
            with torch.autocast("cpu", enabled=False):
                return _PaddedForwardConvolution.apply(input.to(dtype), weight, None if bias is None else
                                                       bias.to(dtype), self.stride, plan.padding, self.dilation,
                                                       self.groups)
        input, weight, padding = apply_plan(plan, input, weight)
        return F.conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups)
