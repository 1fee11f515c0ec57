"""seg.models.conv: dilated convolutions in bf16 take an exact fast path (dropped padded taps, measured padding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seg.models.conv as conv_module
from seg.models.conv import Conv2d, padding_choices, plan_convolution, set_padding_policy
from seg.models.fusion import FusedConv2d, fuse_conv_bn


@pytest.fixture(autouse=True)
def _fresh_choices():
    conv_module.clear_padding_choices()
    yield
    set_padding_policy("measure")
    conv_module.clear_padding_choices()


def exact_reference(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The float32 convolution of the bf16-rounded input and weights: what a bf16 kernel computes before it rounds
    its output."""
    weight, bias = conv.weight.detach(), conv.bias.detach() if conv.bias is not None else None
    return F.conv2d(x.bfloat16().float(), weight.bfloat16().float(), None if bias is None else bias.bfloat16().float(),
                    conv.stride, conv.padding, conv.dilation, conv.groups)


def assert_bf16_exact(out: torch.Tensor, reference: torch.Tensor) -> None:
    """Within the bf16 rounding of the output (2^-8 relative) plus float32 accumulation-order noise."""
    error = (out.float() - reference).abs()
    bound = reference.abs() * 2**-8 + 1e-4 * reference.abs().max()
    assert bool((error <= bound).all()), f"max error {error.max():.3g} beyond bf16 rounding"


@pytest.mark.parametrize("policy", ["implicit", "explicit", "measure"])
@pytest.mark.parametrize("dilation, height, width", [(2, 20, 24), (12, 20, 24), (36, 20, 24), (12, 40, 9),
                                                     (6, 6, 30)])
def test_every_path_is_the_convolution_to_bf16_rounding(policy, dilation, height, width):
    set_padding_policy(policy)
    torch.manual_seed(dilation)
    conv = Conv2d(32, 16, 3, padding=dilation, dilation=dilation, groups=2, bias=True).bfloat16()
    x = torch.randn(2, 32, height, width).contiguous(memory_format=torch.channels_last).bfloat16()
    with torch.no_grad():
        out = conv(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, height, width)
    assert_bf16_exact(out, exact_reference(x, conv))


def test_taps_that_only_see_padding_are_dropped():
    conv = Conv2d(8, 8, 3, padding=36, dilation=36)
    x = torch.randn(1, 8, 32, 80, dtype=torch.bfloat16)
    plan = plan_convolution(conv, x, conv.weight)
    # 32 rows: the rows +-36 away are always padding; 80 columns: the columns +-36 away are read.
    assert plan is not None
    assert (plan.rows, plan.columns) == (slice(1, 2), slice(0, 3))
    assert plan.padding == (0, 36)
    set_padding_policy("implicit")
    small = torch.randn(1, 8, 24, 24, dtype=torch.bfloat16)
    plan = plan_convolution(conv, small, conv.weight)
    assert (plan.rows, plan.columns, plan.padding, plan.explicit) == (slice(1, 2), slice(1, 2), (0, 0), False)


def test_float32_undilated_and_instrumented_convolutions_are_standard():
    from torch.utils.flop_counter import FlopCounterMode

    set_padding_policy("explicit")  # where a plan is allowed at all, there is one
    dilated = Conv2d(8, 8, 3, padding=12, dilation=12)
    plain = Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 16, 16)
    assert plan_convolution(dilated, x, dilated.weight) is None  # fp32: oneDNN already skips padded taps
    assert plan_convolution(plain, x.bfloat16(), plain.weight) is None  # no dilation: nothing to choose
    assert plan_convolution(dilated, x.bfloat16(), dilated.weight) is not None
    with FlopCounterMode(display=False):
        assert plan_convolution(dilated, x.bfloat16(), dilated.weight) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plan_convolution(dilated, x, dilated.weight) is not None  # autocast computes in bf16


def test_padding_is_measured_once_per_shape_and_size(monkeypatch):
    calls = []

    def fake_measurement(x, weight, dtype, conv, padding):
        calls.append((x.shape[2], x.shape[3]))
        return x.shape[2] >= 24  # "explicit is faster" on the larger maps only

    monkeypatch.setattr(conv_module, "_explicit_is_faster", fake_measurement)
    conv = Conv2d(8, 8, 3, padding=4, dilation=4).bfloat16()
    sizes = [16, 16, 20, 24, 28, 32]
    plans = [plan_convolution(conv, torch.randn(1, 8, s, s, dtype=torch.bfloat16), conv.weight) for s in sizes]
    # Four sizes measured (16 once), then the fifth new size (32) reuses the nearest measured one (28).
    assert calls == [(16, 16), (20, 20), (24, 24), (28, 28)]
    assert [plan is not None and plan.explicit for plan in plans] == [False, False, False, True, True, True]
    assert len(padding_choices()) == 4


def test_measurement_times_both_paths_on_the_real_kernel():
    conv = Conv2d(16, 16, 3, padding=8, dilation=8).bfloat16()
    x = torch.randn(2, 16, 24, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        conv(x)
    ((shape, height, width), choice), = padding_choices().items()
    assert shape[0] == torch.bfloat16 and (height, width) == (24, 24) and isinstance(choice, bool)


def test_training_under_autocast_takes_the_same_gradients_on_both_paths():
    torch.manual_seed(0)
    conv = Conv2d(16, 8, 3, padding=12, dilation=12)
    x = torch.randn(2, 16, 20, 20, requires_grad=True)
    grads = {}
    for policy in ("implicit", "explicit"):
        set_padding_policy(policy)
        conv.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        grads[policy] = (conv.weight.grad.clone(), x.grad.clone())
    for implicit, explicit in zip(grads["implicit"], grads["explicit"]):
        assert torch.allclose(implicit, explicit, rtol=2e-2, atol=2e-2 * implicit.abs().max().item())


def test_fused_convolution_runs_in_bf16_with_the_dilated_path(randomize_batchnorm):
    from seg.models import build_segmentor

    model = randomize_batchnorm(build_segmentor("deeplabv3", backbone="resnest14", num_classes=4))
    fused = fuse_conv_bn(model).to(memory_format=torch.channels_last).bfloat16()
    x = torch.randn(1, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    convs = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    assert convs and all(isinstance(m, Conv2d) for m in convs)
    branch = fused.head.aspp.b1[0]
    assert isinstance(branch, FusedConv2d) and branch.dilation == (12, 12)
    with torch.no_grad():
        assert branch._onednn_applies(torch.randn(1, 2048, 12, 12, dtype=torch.bfloat16), None)
        reference = model(x)
        out = fused(x.bfloat16()).float()
    # bf16 rounds weights and activations by 2^-8 relative; the logits of this untrained net follow within a few
    # percent of their range at worst and a fraction of a percent on average. (Argmax agreement is the guard of a
    # trained model: tests/engine/test_precision.py.)
    scale = reference.abs().max()
    error = (out - reference).abs()
    assert error.max() < 0.05 * scale and error.mean() < 0.01 * scale


def test_deterministic_mode_times_nothing(monkeypatch):
    monkeypatch.setattr(conv_module, "_explicit_is_faster", lambda *args: pytest.fail("timed under determinism"))
    conv = Conv2d(8, 8, 3, padding=4, dilation=4).bfloat16()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert plan_convolution(conv, torch.randn(1, 8, 16, 16, dtype=torch.bfloat16), conv.weight) is None
    finally:
        torch.use_deterministic_algorithms(was)
    assert padding_choices() == {}
