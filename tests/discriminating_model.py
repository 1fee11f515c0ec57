"""A discriminating fixture model for the prediction, export and inference tests, and the reference they use.

The 8-iteration toy run predicts background on every pixel, so a test on it cannot tell a right mask from a
wrong one. :func:`write_discriminating_checkpoint` writes, through the trainer's own ``Trainer.save``, a
checkpoint of the real DeepLabV3-ResNeSt14 whose weights are set (in seconds, deterministically, no training)
so that its masks are

- varied: several classes per image (the classifier is fitted to the toy scenes' classes);
- confident: the classifier is scaled until most pixels have a clear margin between their two best classes;
- dependent on colour (RGB vs BGR), on intensity scale (uint8 vs floats not multiplied by 255), on position (the
  mask of a mirrored image is not the mirrored mask) and on scale.

How: every BatchNorm gets random affine parameters and running statistics measured on toy scenes, so activations
stay normalised on real images as in a trained network (random running statistics would blow them up); then the
final 1x1 classifier is a class-balanced ridge regression of the head's features onto the scenes' masks,
multiplied by a gain that sets the margin. :func:`discrimination_report` measures those properties; the
``discriminating_checkpoint`` fixture (tests/conftest.py) asserts them, so the model cannot silently degrade into
a constant one.

The reference the tests compare against is written out here, independently of ``seg``'s preprocessing and
inference: the plain float32 eval model rebuilt from the checkpoint's state dict, with ImageNet normalisation
spelled out (:func:`normalise`) and a softmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from seg.data.toy import PALETTE, toy_scene
from seg.data.transforms import IMAGENET_MEAN as MEAN
from seg.data.transforms import IMAGENET_STD as STD

CLASSES = ("background", "disc", "box", "stripe")
PALETTE_ARRAY = np.array(PALETTE, np.uint8)
CROP_SIZE, BASE_SIZE = 96, 128  # the training sizes stored in the checkpoint (the toy recipe's)
# Toy train scenes (seeds 0..15 at 96 x 96) set the statistics and the fit; the toy val split, which the tests and
# the report use, is generated from other seeds.
CALIBRATION_SEEDS = range(16)
CALIBRATION_SIZE = (96, 96)
RIDGE = 1e-3  # relative to the mean feature energy: the fit is well posed even with dead ReLU channels
# The gain puts the 25th-percentile gap between the two best logits at this many nats on the calibration scenes.
MARGIN_NATS = 5.0
# A pixel whose two best reference probabilities differ by less than this is a tie that float rounding may break
# either way (segmenter and reference probabilities differ by up to ~2e-5: folded batch norm, channels_last, another
# summation order); masks are compared everywhere else. Slide averaging leaves ~0.5 % of pixels below it.
TIE_MARGIN = 1e-4


def training_config(output_dir: Path, seed: int):
    """The toy run this checkpoint pretends to come from: ResNeSt-14, output stride 8, no auxiliary head."""
    from seg.config import TrainConfig

    return TrainConfig(dataset="toy", backbone="resnest14", output_stride=8, aux=False, pretrained="none", iters=1,
                       batch_size=2, crop_size=CROP_SIZE, base_size=BASE_SIZE, workers=0, device="cpu", seed=seed,
                       output_dir=str(output_dir))


def normalise(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) RGB on the 0..255 scale (uint8 or float) -> (1, 3, H, W) float32: x / 255, minus mean, over std."""
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def calibration_scenes() -> Tuple[torch.Tensor, np.ndarray]:
    """(normalised (N, 3, H, W) images, (N, H, W) masks) of the calibration toy scenes."""
    scenes = [toy_scene(*CALIBRATION_SIZE, seed=seed) for seed in CALIBRATION_SEEDS]
    images = torch.cat([normalise(image) for image, _ in scenes])
    return images, np.stack([mask for _, mask in scenes])


def randomize_batchnorm_parameters(model: nn.Module, generator: torch.Generator) -> List[nn.Module]:
    """Give every BN random affine parameters (residual-branch ends ``bn3`` small, as in a trained ResNet) and
    reset statistics that the next train-mode pass sets to its own (momentum None); returns those BN modules,
    whose momentum the caller puts back after that pass."""
    norms = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                residual_end = name.endswith("bn3")
                module.weight.copy_(torch.rand(n, generator=generator) * (0.3 if residual_end else 1.0)
                                    + (0.0 if residual_end else 0.5))
                module.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.reset_running_stats()
                module.momentum = None  # a cumulative average: after one pass, that pass's statistics
                norms.append(module)
    return norms


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> None:
    """Random BN affine parameters and running statistics measured on ``images`` in one train-mode pass with
    dropout off; leaves the model in eval mode."""
    norms = randomize_batchnorm_parameters(model, generator)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()  # statistics of the features eval mode will see, not of dropped-out ones
    with torch.no_grad():
        model(images)
    for module in norms:
        module.momentum = 0.1
    model.eval()


def head_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The DeepLabV3 head's input to its final 1x1 classifier: (N, 256, h, w) at the output stride."""
    with torch.no_grad():
        return model.head.block[:-1](model.head.aspp(model.backbone.forward_features(images)[3]))


def fit_classifier(model: nn.Module, images: torch.Tensor, masks: np.ndarray) -> None:
    """Set the final classifier to a class-balanced ridge regression of the head's features onto one-hot masks,
    scaled so the 25th-percentile top-2 logit gap is ``MARGIN_NATS``."""
    features = head_features(model, images)
    n, channels, h, w = features.shape
    # Mask values at the feature cells' centres as align_corners=True upsampling places them.
    rows = np.rint(np.linspace(0, masks.shape[1] - 1, h)).astype(int)
    cols = np.rint(np.linspace(0, masks.shape[2] - 1, w)).astype(int)
    targets = torch.from_numpy(masks[:, rows][:, :, cols].astype(np.int64)).reshape(-1)
    counts = torch.bincount(targets, minlength=len(CLASSES))
    assert (counts > 0).all(), f"the calibration scenes lack a class: {counts.tolist()}"
    x = torch.cat([features.permute(0, 2, 3, 1).reshape(-1, channels).double(),
                   torch.ones(n * h * w, 1, dtype=torch.float64)], 1)
    y = nn.functional.one_hot(targets, len(CLASSES)).double()
    weights = (1.0 / counts.double())[targets].unsqueeze(1)  # each class weighs the same in total
    gram = x.T @ (weights * x)
    gram += torch.eye(channels + 1, dtype=torch.float64) * RIDGE * gram.diagonal().mean()
    solution = torch.linalg.solve(gram, x.T @ (weights * y))  # (channels + 1, classes)
    best_two = (x @ solution).topk(2, dim=1).values
    gain = MARGIN_NATS / torch.quantile(best_two[:, 0] - best_two[:, 1], 0.25)
    classifier = model.head.block[-1]
    with torch.no_grad():
        classifier.weight.copy_((gain * solution[:-1]).T.reshape(len(CLASSES), channels, 1, 1))
        classifier.bias.copy_(gain * solution[-1])


def write_discriminating_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the discriminating model (module docstring) to ``path`` with ``Trainer.save``: the trainer's payload
    (the model card, weights, optimiser, schedule, RNG states, config). The global
    RNG state is left as it was."""
    from seg.engine.trainer import Trainer

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        trainer = Trainer(training_config(path.parent, seed))
        images, masks = calibration_scenes()
        calibrate_batchnorm(trainer.model, images, torch.Generator().manual_seed(seed))
        fit_classifier(trainer.model, images, masks)
        saved = trainer.save(path.name)
    assert saved == path, saved
    return path


def reference_model(checkpoint: Path) -> nn.Module:
    """The checkpoint's network as plain float32 eval PyTorch: its state dict loaded into the architecture its
    model card names, with no batch norm folding, memory format or precision changes."""
    from seg.engine.checkpoint import checkpoint_card
    from seg.models import build_segmentor

    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = build_segmentor(**checkpoint_card(payload, checkpoint).builder_arguments())
    model.load_state_dict(payload["model"])
    return model.eval()


def reference_probabilities(model: nn.Module, rgb: np.ndarray) -> np.ndarray:
    """(C, H, W) float32 softmax of ``model`` on the (H, W, 3) RGB image (0..255 scale), normalised here."""
    with torch.no_grad():
        return model(normalise(rgb)).softmax(1)[0].numpy()


def margins(probabilities: np.ndarray) -> np.ndarray:
    """(H, W): the best class's probability minus the second best's."""
    best_two = np.sort(probabilities, axis=0)[-2:]
    return best_two[1] - best_two[0]


def assert_mask_matches(mask: np.ndarray, reference: np.ndarray, label: str = "") -> None:
    """``mask`` is the argmax of the ``reference`` probabilities on every pixel that is not a near tie (and near
    ties are at most 1 % of the image)."""
    decided = margins(reference) >= TIE_MARGIN
    assert decided.mean() >= 0.99, f"{label}: {1 - decided.mean():.1%} of pixels are near ties"
    assert mask.shape == reference.shape[1:], (label, mask.shape, reference.shape)
    wrong = (mask != reference.argmax(0)) & decided
    assert not wrong.any(), f"{label}: {wrong.mean():.1%} of pixels get another class than the reference"


def discrimination_report(checkpoint: Path, images: Sequence[np.ndarray]) -> Dict[str, float]:
    """How discriminating the checkpoint's model is on ``images`` ((H, W, 3) uint8 RGB, sides even):

    - ``fewest_classes``: over the images, the least number of classes that each cover >= 2 % of an image;
    - ``confident``: the fraction of pixels whose two best probabilities are >= 0.5 apart;
    - ``changed_by_channel_swap``: the fraction of pixels whose class changes when R and B are swapped;
    - ``changed_by_missing_x255``: ... when the image is read as floats in [0, 1] that are never multiplied by
      255 (values / 255 normalised as if on the 0..255 scale: nearly black);
    - ``changed_by_mirror``: ... between the mask of the mirrored image and the mirrored mask;
    - ``changed_by_half_scale``: ... between the mask of the image at half size and every other pixel of the mask.
    """
    model = reference_model(checkpoint)
    classes, confident, swap, x255, mirror, scale = [], [], [], [], [], []
    for rgb in images:
        probabilities = reference_probabilities(model, rgb)
        mask = probabilities.argmax(0)
        shares = np.bincount(mask.ravel(), minlength=len(CLASSES)) / mask.size
        classes.append(int((shares >= 0.02).sum()))
        confident.append((margins(probabilities) >= 0.5).mean())
        swap.append((reference_probabilities(model, rgb[..., ::-1]).argmax(0) != mask).mean())
        x255.append((reference_probabilities(model, rgb.astype(np.float32) / 255.0).argmax(0) != mask).mean())
        mirrored = reference_probabilities(model, rgb[:, ::-1]).argmax(0)[:, ::-1]
        mirror.append((mirrored != mask).mean())
        half = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] // 2, rgb.shape[0] // 2), Image.BILINEAR))
        scale.append((reference_probabilities(model, half).argmax(0) != mask[::2, ::2]).mean())
    return {"fewest_classes": min(classes), "confident": float(np.mean(confident)),
            "changed_by_channel_swap": float(np.mean(swap)), "changed_by_missing_x255": float(np.mean(x255)),
            "changed_by_mirror": float(np.mean(mirror)), "changed_by_half_scale": float(np.mean(scale))}
