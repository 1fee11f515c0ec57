"""Inference-time graph surgery: batch norm folded into the convolution before it.

In eval mode a BatchNorm after a convolution is a fixed per-channel affine map, so it can be folded into the
convolution's weight and bias: the network computes the same function (to float rounding) with one memory pass
fewer per convolution. :func:`fuse_conv_bn` does this for every convolution -> batch norm pair that a module
declares, which is how eval, predict, export and :class:`~seg.Segmenter` run a model.

A module declares its pairs with a ``conv_bn_pairs`` attribute: ``(conv_name, bn_name)`` tuples where the batch
norm directly consumes the convolution's output in ``forward``. A convolution name may also point at an
``nn.Sequential`` that ends with a convolution (the deep stem). Inside any ``nn.Sequential``, a convolution
immediately followed by a batch norm is a pair too. The folded batch norm is replaced by ``nn.Identity``, so the
forward code runs unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


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
        pairs = list(getattr(module, "conv_bn_pairs", ()))
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if not isinstance(bn, _BatchNorm):
                continue  # absent for this variant (e.g. bn2 of a split-attention block) or already folded
            if isinstance(conv, nn.Conv2d):
                setattr(module, conv_name, fold_batch_norm(conv, bn))
            elif (found := _last_conv(conv)) is not None:
                parent, child, last = found
                setattr(parent, child, fold_batch_norm(last, bn))
            else:
                continue
            setattr(module, bn_name, nn.Identity())
        if isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                conv, bn = module[index], module[index + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
                    module[index] = fold_batch_norm(conv, bn)
                    module[index + 1] = nn.Identity()
    return model.eval()  # the Identity modules are created in train mode
