"""Inference-time graph surgery: batch norm folded into the convolution before it.

In eval mode a BatchNorm after a convolution is a fixed per-channel affine map, so it can be folded into the
convolution's weight and bias: the network computes the same function (to float rounding) with one memory pass
fewer per convolution. :func:`fuse_conv_bn` does this for every convolution -> batch norm pair that a module
declares, which is how eval, predict, export and :class:`~seg.Segmenter` run a model.

A module declares its pairs with a ``conv_bn_pairs`` attribute: ``(conv_name, bn_name)`` tuples where the batch
norm directly consumes the convolution's output in ``forward``, or ``(conv_name, bn_name, relu_name)`` when a ReLU
module of its own follows (in eval mode; an eval-time no-op such as DropBlock may sit between). A convolution name
may also point at an ``nn.Sequential`` that ends with a convolution (the deep stem). Inside any ``nn.Sequential``, a
convolution immediately followed by a batch norm (and a ReLU) is a pair too. The folded batch norm and the fused
ReLU are replaced by ``nn.Identity``, so the forward code runs unchanged. A module may also name, with
``residual_conv``, a convolution whose output is added to a shortcut and then passed through a ReLU: it becomes a
:class:`FusedConv2d` taking the shortcut (the module's ``forward`` asks ``conv.adds_residual``).

:class:`FusedConv2d` runs the convolution, its ReLU and the residual sum as one oneDNN primitive on the CPU (one
pass over the output instead of three); everywhere else (CUDA, autograd, autocast, tracing, ``torch.compile``,
export) it is the same plain PyTorch operations, so the exported graph is standard.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .conv import Conv2d, apply_plan, instrumented, plan_convolution


# The dtypes oneDNN's fused convolution takes (bf16 runs on AMX / AVX-512 BF16 where the CPU has them).
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _onednn_fusion_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution operators (x86 CPU builds do)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


class FusedConv2d(Conv2d):
    """A convolution (its batch norm already folded in) followed by a ReLU and, with ``adds_residual``, preceded
    by the sum with a shortcut: ``forward(x, residual)`` is ``relu(conv(x) + residual)``.

    Same parameters as the convolution it replaces. On the CPU, in float32 or bfloat16 (weights and input in the
    same dtype, as a model cast for bf16 inference has them) without autograd, it is one oneDNN primitive with the
    sum and the ReLU as post-ops; otherwise the plain operations. Dilated convolutions in bf16 take
    :class:`~seg.models.conv.Conv2d`'s measured padding path either way.
    """

    def __init__(self, *args, relu: bool = True, adds_residual: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = relu
        self.adds_residual = adds_residual

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, relu: bool = True, adds_residual: bool = False) -> "FusedConv2d":
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                    relu=relu, adds_residual=adds_residual)
        fused.weight = conv.weight
        fused.bias = conv.bias
        return fused

    def _onednn_applies(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (x.device.type == "cpu" and x.dtype in ONEDNN_DTYPES and self.weight.dtype == x.dtype
                and not grad and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not torch.is_autocast_enabled("cpu") and not instrumented() and _onednn_fusion_available()
                and (residual is None or self._binary_applies(x, residual)))

    @staticmethod
    def _binary_applies(x: torch.Tensor, residual: torch.Tensor) -> bool:
        """The residual sum as a post-op: the residual in x's dtype and layout; in bf16 only in channels_last
        (this PyTorch's contiguous bf16 path falls back to an add_relu kernel that has no bf16 version)."""
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if x.dtype != torch.float32 and not channels_last:
            return False
        return residual.dtype == x.dtype and residual.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (N, in_channels, H, W); residual (with ``adds_residual``): the (N, out_channels, H', W') shortcut."""
        if self.adds_residual != (residual is not None):
            raise ValueError("FusedConv2d takes a residual exactly when it was built with adds_residual=True")
        weight, padding = self.weight, self.padding
        plan = plan_convolution(self, x, weight)
        if plan is not None:
            x, weight, padding = apply_plan(plan, x, weight)
        if self._onednn_applies(x, residual):
            unary = "relu" if self.relu else None
            geometry = (list(padding), list(self.stride), list(self.dilation), self.groups)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *geometry, unary or "none",
                                                               [], "")
            if residual.shape[1:] == (self.out_channels,) + tuple(residual.shape[2:]):
                return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, self.bias, *geometry,
                                                                      "add", None, unary, [], "")
        out = F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)
        if residual is not None:
            out = out + residual
        return F.relu(out) if self.relu else out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}, adds_residual={self.adds_residual}"


def fold_batch_norm(conv: nn.Conv2d, bn: _BatchNorm) -> nn.Conv2d:
    """A convolution computing ``bn(conv(x))`` with ``bn``'s running statistics (eval-mode batch norm).

    The new weight is ``w * gamma / sqrt(var + eps)`` per output channel and the bias
    ``(b - mean) * gamma / sqrt(var + eps) + beta``, computed in float64 and stored in the conv's dtype.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batch_norm needs a batch norm with running statistics")
    fused = copy.deepcopy(conv)
    weight = conv.weight.detach().double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    fused.weight = nn.Parameter((weight * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype),
                                requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return fused


def _last_conv(module: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    """(parent, child name, conv) of ``module`` itself or of its last child when it is a Sequential."""
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Conv2d):
        return module, str(len(module) - 1), module[-1]
    return None


def fuse_conv_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` (in eval mode) with every declared convolution -> batch norm pair folded.

    Args:
        model: a network in eval mode (folding uses the running statistics, so it is wrong for training).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The fused network, in eval mode; its outputs match ``model``'s to float rounding (within 1e-4 for seg's
        networks in float32; ``tests/models/test_fusion.py``).
    """
    if model.training:
        raise ValueError("fuse_conv_bn folds running statistics: call model.eval() first")
    model = model if inplace else copy.deepcopy(model)
    for module in list(model.modules()):
        residual_conv = getattr(module, "residual_conv", None)
        for conv_name, bn_name, *relu_name in list(getattr(module, "conv_bn_pairs", ())):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if not isinstance(bn, _BatchNorm):
                continue  # absent for this variant (e.g. bn2 of a split-attention block) or already folded
            if isinstance(conv, nn.Conv2d):
                parent, child, conv = module, conv_name, conv
            elif (found := _last_conv(conv)) is not None:
                parent, child, conv = found
            else:
                continue
            folded = fold_batch_norm(conv, bn)
            setattr(module, bn_name, nn.Identity())
            if conv_name == residual_conv:
                folded = FusedConv2d.from_conv(folded, relu=True, adds_residual=True)
            elif relu_name and isinstance(getattr(module, relu_name[0]), nn.ReLU):
                folded = FusedConv2d.from_conv(folded, relu=True)
                setattr(module, relu_name[0], nn.Identity())
            setattr(parent, child, folded)
        if isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                conv, bn = module[index], module[index + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
                    module[index] = fold_batch_norm(conv, bn)
                    module[index + 1] = nn.Identity()
                    if index + 2 < len(module) and isinstance(module[index + 2], nn.ReLU):
                        module[index] = FusedConv2d.from_conv(module[index], relu=True)
                        module[index + 2] = nn.Identity()
    return model.eval()  # the Identity modules are created in train mode
