"""Batch norm folded into convolutions: the same function (within 1e-4 in float32), no batch norm left."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from seg.models import build_backbone, build_segmentor
from seg.models.fusion import fold_batch_norm, fuse_conv_bn
from seg.models.segmentors import upsample_logits


class LastFeatures(nn.Module):
    """A feature-extractor backbone whose forward() is its c4 map."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)[-1]


def batch_norms(model: nn.Module) -> list:
    return [name for name, module in model.named_modules() if isinstance(module, _BatchNorm)]


@pytest.mark.parametrize("build", [
    lambda: build_backbone("resnest14", num_classes=10),
    lambda: LastFeatures(build_backbone("resnest14", num_classes=0, output_stride=8)),
    lambda: build_backbone("resnet50", num_classes=10),
    lambda: build_backbone("resnest50_fast_2s1x64d", num_classes=10),
    lambda: build_segmentor("deeplabv3", backbone="resnest14", num_classes=7),
    lambda: build_segmentor("fcn", backbone="resnest14", num_classes=7, output_stride=16),
], ids=["resnest14", "resnest14-os8", "resnet50", "resnest50-fast", "deeplabv3", "fcn-os16"])
def test_fused_network_matches_and_has_no_batch_norm(build, randomize_batchnorm):
    torch.manual_seed(0)
    model = randomize_batchnorm(build())
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        reference = model(x)
        fused = fuse_conv_bn(model)
        out = fused(x)
        out_nhwc = fused.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert batch_norms(fused) == []
    assert batch_norms(model), "the original network must be left untouched"
    assert not fused.training
    assert reference.abs().max() > 0.1  # a non-trivial output, so the 1e-4 tolerance means something
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(out_nhwc, reference, rtol=0, atol=1e-4)


def test_fold_batch_norm_is_the_affine_map_of_running_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(5, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fold_batch_norm(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fusing_a_training_network_is_refused():
    model = build_backbone("resnest14", num_classes=10).train()
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(model)


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_network_in_train_mode_computes_its_eval_function_and_trains(batch, randomize_batchnorm):
    """A folded batch norm stays folded: after train() the network still normalises with the statistics folded
    into its weights, not the batch's (a batch of one included, where the pooled branches' batch norm would have
    one value per channel), and gradients reach its weights. Dropout, random in train mode by design, is held
    in eval mode so that the outputs can be compared."""
    torch.manual_seed(0)
    model = randomize_batchnorm(build_segmentor("deeplabv3", backbone="resnest14", num_classes=3))
    x = torch.randn(batch, 3, 48, 48)
    with torch.no_grad():
        expected_main = model(x)
        expected_aux = upsample_logits(model.aux_head(model.backbone.forward_features(x)[2]), (48, 48))
    fused = fuse_conv_bn(model).train()
    for module in fused.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    assert fused.training and fused.backbone.layer3[0].conv2.training
    main, aux = fused(x)  # train mode: the main and auxiliary logits
    assert expected_main.abs().max() > 0.1 and expected_aux.abs().max() > 0.1
    torch.testing.assert_close(main, expected_main, rtol=0, atol=1e-4)
    torch.testing.assert_close(aux, expected_aux, rtol=0, atol=1e-4)
    (main.square().mean() + aux.square().mean()).backward()
    assert fused.backbone.conv1[0].weight.grad.abs().sum() > 0 and fused.head.block[-1].weight.grad is not None


def test_fused_convolutions_run_as_one_onednn_operator_on_cpu_and_count_their_flops(randomize_batchnorm):
    from torch.utils.flop_counter import FlopCounterMode

    from seg.models.fusion import FusedConv2d

    model = randomize_batchnorm(build_backbone("resnest14", num_classes=10))
    fused = fuse_conv_bn(model)
    kinds = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    assert sum(m.adds_residual for m in kinds) == 4 and len(kinds) > 8  # every block's conv3, and the ReLU convs
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    fused = fused.to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = model(x)
        with torch.profiler.profile() as profile:
            out = fused(x)
        counter = FlopCounterMode(display=False)
        with counter:
            counted = fused(x)
        plain = FlopCounterMode(display=False)
        with plain:
            model(x)
    names = {event.key for event in profile.key_averages()}
    if torch.backends.mkldnn.is_available():
        assert "mkldnn::_convolution_pointwise" in names
    assert (out - reference).abs().max() <= 1e-4 and (counted - reference).abs().max() <= 1e-4
    # A FLOP counter (a dispatch mode) sees the standard convolutions: the fused model costs what the plain one does.
    assert counter.get_total_flops() == plain.get_total_flops()



@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_channels_last_inference_feeds_every_layer_channels_last(batch, fused):
    """Every convolution and pool gets a channels_last map with canonical strides. Two places broke this: with
    a batch of one the split-attention product's batch stride is arbitrary, so PyTorch's layout heuristic took
    it for NCHW and the avd pool and next convolution ran their NCHW paths after a copy; and the ASPP
    concatenation with the broadcast image-pooling branch came out NCHW and was copied back."""
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=5).eval()
    if fused:
        model = fuse_conv_bn(model)
    model = model.to(memory_format=torch.channels_last)
    layouts = {}

    def record(name):
        def hook(module, inputs):
            x = inputs[0]
            if x.dim() == 4 and x.shape[2] * x.shape[3] > 1:  # a 1x1 map has no layout to keep
                layouts[name] = x.stride() == torch.empty(x.shape, memory_format=torch.channels_last).stride()
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d)):
            module.register_forward_pre_hook(record(name))
    x = torch.randn(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
    assert len(layouts) > 30 and "backbone.layer3.0.avd_layer" in layouts and "head.aspp.project.0" in layouts
    assert [name for name, kept in layouts.items() if not kept] == []
    assert out.is_contiguous(memory_format=torch.channels_last)
