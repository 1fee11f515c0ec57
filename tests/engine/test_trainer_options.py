"""Trainer options of the from-scratch work: class weights reach the loss, --amp auto, validation at the training
scale; the after-step hooks and the model card the trainer builds."""

from __future__ import annotations

import json

import pytest
import torch

from seg.config import build_config
from seg.engine.checkpoint import load_checkpoint
from seg.engine.inference import InferenceOptions, resolve_inference
from seg.engine.inference import test_scales_for as dataset_test_scales  # not a test
from seg.engine.precision import precision_name, resolve_precision
from seg.engine.trainer import Trainer

TINY = {"dataset": "toy", "iters": 2, "batch_size": 2, "crop_size": 48, "base_size": 64, "workers": 0,
        "val_limit": 2, "device": "cpu"}


def _trainer(tmp_path, **settings) -> Trainer:
    return Trainer(build_config({**TINY, "output_dir": str(tmp_path / "run"), **settings}))


def test_class_weights_file_and_power_reach_the_loss(tmp_path, monkeypatch):
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps([1.0, 4.0, 9.0, 16.0]))
    trainer = _trainer(tmp_path, class_weights=str(weights), class_weights_power=0.5)
    assert trainer.class_weights.tolist() == [1.0, 2.0, 3.0, 4.0]
    seen = {}

    def spy(outputs, target, aux_weight, class_weights=None, ohem=None):
        seen["weights"] = class_weights
        return outputs[0].float().mean() if isinstance(outputs, tuple) else outputs.float().mean()

    monkeypatch.setattr("seg.engine.trainer.segmentation_loss", spy)
    trainer.train_step(iter(trainer.loader))
    assert seen["weights"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_amp_auto_follows_the_hardware(tmp_path):
    trainer = _trainer(tmp_path, amp="auto")
    expected = resolve_precision("auto", torch.device("cpu"))
    assert trainer.amp_dtype == (None if expected == torch.float32 else expected)


def test_validation_runs_at_the_training_base_size(tmp_path):
    trainer = _trainer(tmp_path, base_size=80)
    sizes = []
    first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    handle = first_conv.register_forward_pre_hook(lambda module, inputs: sizes.append(tuple(inputs[0].shape[-2:])))
    try:
        metrics = trainer.validate()
    finally:
        handle.remove()
    assert sizes and all(max(size) == 80 for size in sizes)  # toy images are 128x128: resized to the base size
    # ...and scored at the labels' own resolution.
    assert int(torch.as_tensor(metrics["confusion_matrix"]).sum()) == 2 * 128 * 128


def test_after_step_hooks_run_after_each_step_before_its_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, checkpoint_every=1, eval_every=2, val_limit=1)
    last = tmp_path / "run" / "last.pth"
    seen = []

    def hook(t: Trainer) -> None:
        seen.append((t.iteration, load_checkpoint(last)["iteration"] if last.exists() else None))

    trainer.after_step_hooks = [hook]  # this trainer's own; Trainer.after_step_hooks (process-wide) stays empty
    trainer.run()
    assert seen == [(1, None), (2, 1)]  # step N counted, its checkpoint not yet written
    assert Trainer.after_step_hooks == []


def test_the_model_is_built_from_the_card_and_validation_puts_its_metrics_on_it(tmp_path):
    trainer = _trainer(tmp_path, aux=False, output_stride=16)
    card = trainer.card
    assert (card.segmentor, card.backbone, card.output_stride, card.aux) == ("deeplabv3", "resnest14", 16, False)
    assert card.classes == tuple(trainer.train_set.classes) and (card.crop_size, card.base_size) == (48, 64)
    assert card.test_scales == dataset_test_scales("toy") and card.metrics == ()
    assert trainer.model.aux_head is None
    # Validation: whole images at the training base size, the inference the card itself resolves to.
    assert trainer.validation_inference == resolve_inference(card, InferenceOptions(amp_dtype=trainer.amp_dtype))
    assert (trainer.validation_inference.mode, trainer.validation_inference.base_size) == ("whole", 64)
    metrics = trainer.validate()
    (measured,) = trainer.card.metrics
    assert (measured.dataset, measured.split, measured.inference, measured.precision) == (
        "toy", "val", "single-scale", precision_name(trainer.amp_dtype))
    assert (measured.mIoU, measured.pixAcc, measured.iteration) == (metrics["mIoU"], metrics["pixAcc"], 0)


@pytest.mark.parametrize("power", [-1.0, float("nan")])
def test_bad_power_is_named(power):
    from seg.config import ConfigError

    with pytest.raises(ConfigError, match="^class_weights_power ") as raised:
        build_config({**TINY, "class_weights_power": power})
    assert raised.value.setting == "class_weights_power"
