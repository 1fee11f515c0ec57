"""DeepLabV3 / FCN segmentors: the paper's head, sizes, train/eval outputs, batch-1 training, Encoding layout."""

from __future__ import annotations

import pytest
import torch

from seg.models import build_segmentor, list_segmentors, load_pretrained
from seg.models.complexity import count_parameters
from seg.models.heads import aspp_rates


def test_deeplabv3_resnest50_parameter_counts_match_the_reference():
    with torch.device("meta"):
        model = build_segmentor("deeplabv3", backbone="resnest50", num_classes=150, aux=True)
    assert count_parameters(model) == 43_996_588
    assert count_parameters(model.backbone) == 25_434_240
    assert count_parameters(model.head) == 16_163_990
    assert count_parameters(model.aux_head) == 2_398_358


def test_aspp_rates_scale_with_output_stride():
    assert aspp_rates(8) == (12, 24, 36)
    assert aspp_rates(16) == (6, 12, 18)
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=3, output_stride=16)
    assert [model.head.aspp.b1[0].dilation[0], model.head.aspp.b3[0].dilation[0]] == [6, 18]
    with pytest.raises(ValueError, match="output_stride"):
        aspp_rates(4)


@pytest.mark.parametrize("name", ["deeplabv3", "fcn"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_outputs_have_the_input_size_in_train_and_eval(name, output_stride):
    model = build_segmentor(name, backbone="resnest14", num_classes=7, output_stride=output_stride)
    x = torch.randn(2, 3, 97, 131)
    main, aux = model.train()(x)
    assert main.shape == aux.shape == (2, 7, 97, 131)
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7, 97, 131)


def test_eval_skips_the_auxiliary_head_and_is_deterministic(randomize_batchnorm):
    model = randomize_batchnorm(build_segmentor("deeplabv3", backbone="resnest14", num_classes=4))
    calls = []
    model.aux_head.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert calls == [] and torch.equal(first, second)


def test_without_aux_train_mode_returns_main_logits_only():
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=3, aux=False).train()
    assert model.aux_head is None
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 64, 64)


def test_batch_of_one_trains_and_gradients_reach_every_parameter():
    # Plain BatchNorm raises on the ASPP image-pooling branch and the split-attention gates with one image.
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=5, dropblock_prob=0.1).train()
    running_mean = model.head.aspp.b4.gap[2].running_mean.clone()
    main, aux = model(torch.randn(1, 3, 72, 72))
    target = torch.randint(0, 5, (1, 72, 72))
    loss = torch.nn.functional.cross_entropy(main, target) + 0.5 * torch.nn.functional.cross_entropy(aux, target)
    loss.backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []
    # The single pooled value was normalised with the running statistics, which it must not overwrite.
    assert torch.equal(model.head.aspp.b4.gap[2].running_mean, running_mean)


def test_batch_of_two_still_uses_batch_statistics():
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=5).train()
    before = model.head.aspp.b4.gap[2].running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(model.head.aspp.b4.gap[2].running_mean, before)


def test_unknown_names_list_the_choices():
    assert list_segmentors() == ["deeplabv3", "fcn"]
    with pytest.raises(ValueError, match="unknown segmentor 'pspnet'.*deeplabv3"):
        build_segmentor("pspnet")
    with pytest.raises(ValueError, match="unknown backbone 'resnest5'.*resnest50"):
        build_segmentor("deeplabv3", backbone="resnest5")


def _encoding_layout(path):
    """(key, shape) pairs of PyTorch-Encoding's DeepLab_ResNeSt50_ADE checkpoint, from the reference listing."""
    layout = []
    for line in filter(None, path.read_text().splitlines()):
        key, shape = line.split(" ", 1)
        layout.append((key, tuple(int(n) for n in shape.strip("()").split(",") if n.strip())))
    return layout


def test_encoding_deeplab_checkpoint_lands_tensor_by_tensor(shared):
    layout = _encoding_layout(shared("reference", "deeplab_resnest50_ade_keys.txt"))
    generator = torch.Generator().manual_seed(1)
    checkpoint = {
        key: (torch.randint(0, 1000, shape, generator=generator) if key.endswith("num_batches_tracked")
              else torch.randn(shape, generator=generator))
        for key, shape in layout
    }
    model = build_segmentor("deeplabv3", backbone="resnest50", num_classes=150)
    load_pretrained(model, checkpoint)
    ours = model.state_dict()
    renames = {"pretrained.": "backbone.", "auxlayer.": "aux_head.", "head.": "head."}
    landed = set()
    for key, value in checkpoint.items():
        prefix = next(p for p in renames if key.startswith(p))
        target = renames[prefix] + key[len(prefix):]
        assert torch.equal(ours[target], value), f"{key} did not land in {target}"
        landed.add(target)
    assert landed == set(ours)  # every tensor of the model came from the checkpoint
    # Spot-check the semantic places: ASPP pooling conv, projection, classifier, aux classifier.
    assert torch.equal(model.head.aspp.b4.gap[1].weight, checkpoint["head.aspp.b4.gap.1.weight"])
    assert torch.equal(model.head.aspp.project[0].weight, checkpoint["head.aspp.project.0.weight"])
    assert torch.equal(model.head.block[4].bias, checkpoint["head.block.4.bias"])
    assert torch.equal(model.aux_head.conv5[4].weight, checkpoint["auxlayer.conv5.4.weight"])
    assert torch.equal(model.backbone.layer4[2].conv2.fc2.bias, checkpoint["pretrained.layer4.2.conv2.fc2.bias"])
