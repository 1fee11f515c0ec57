"""Augmentation: the fused rescale-pad-crop equals resize + pad + crop, masks never gain labels, seeds
reproduce, and the pipelines emit the documented tensors."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from seg.data import build_dataset, eval_transforms, train_transforms
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomRescaleCrop


def sample(height=60, width=80, seed=0, classes=5):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "mask": rng.integers(0, classes, (height, width), dtype=np.uint8),
        "path": "x.png",
    }


def window(transform, height, width, long_side, seed=0):
    transform.py_random = random.Random(seed)
    return transform._window(height, width, long_side)


@pytest.mark.parametrize("long_side", [40, 97, 160, 333])  # 40 and 97 take the resize route, 160 and 333 the warp
def test_fused_rescale_crop_equals_resize_then_pad_then_crop(long_side):
    data = sample(61, 83)
    crop = (64, 96)
    transform = RandomRescaleCrop(base_size=100, crop_size=crop)
    params = window(transform, 61, 83, long_side, seed=long_side)
    image, mask = transform.apply(data["image"], **params), transform.apply_to_mask(data["mask"], **params)

    scale = long_side / 83
    new_h, new_w = int(61 * scale + 0.5), long_side
    resized = cv2.resize(data["image"], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    padded = np.zeros((max(new_h, crop[0]), max(new_w, crop[1]), 3), np.uint8)
    padded[:new_h, :new_w] = resized
    x0 = round(0.5 * params["matrix"][0, 0] - 0.5 - params["matrix"][0, 2])
    y0 = round(0.5 * params["matrix"][1, 1] - 0.5 - params["matrix"][1, 2])
    expected = padded[y0 : y0 + crop[0], x0 : x0 + crop[1]]
    assert image.shape == expected.shape == (64, 96, 3)
    # Same sampling positions; OpenCV's fixed-point resize and warp weights differ by at most one grey level.
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    valid_h, valid_w = params["valid_h"], params["valid_w"]
    assert (image[valid_h:] == 0).all() and (image[:, valid_w:] == 0).all()
    assert (mask[valid_h:] == 255).all() and (mask[:, valid_w:] == 255).all()
    assert set(np.unique(mask[:valid_h, :valid_w])) <= set(np.unique(data["mask"]))
    # Masks are sampled at the same pixel centres as the image (nearest, never interpolated): both routes equal
    # OpenCV's centre-aligned nearest resize followed by the crop.
    resized_mask = cv2.resize(data["mask"], (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)
    assert np.array_equal(mask[:valid_h, :valid_w], resized_mask[y0 : y0 + valid_h, x0 : x0 + valid_w])


# Shapes down to 1 x 1 and very thin strips (1 x 120), crops and base sizes down to 1 pixel: none may crash (a
# thin image scaled down once lost its short side), and masks never gain values. Derandomized: CI reproducible.
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=st.integers(1, 120),
    width=st.integers(1, 120),
    labels=st.lists(st.integers(0, 254), min_size=1, max_size=6, unique=True),
    crop=st.tuples(st.integers(1, 96), st.integers(1, 96)),
    base=st.integers(1, 160),
    seed=st.integers(0, 2**31 - 1),
    cat_max_ratio=st.sampled_from([0.75, 1.0]),
)
@example(height=1, width=1, labels=[3], crop=(8, 8), base=1, seed=0, cat_max_ratio=0.75)
@example(height=1, width=120, labels=[0, 7], crop=(32, 32), base=16, seed=1, cat_max_ratio=0.75)
@example(height=120, width=1, labels=[0, 7], crop=(1, 96), base=160, seed=2, cat_max_ratio=1.0)
def test_masks_never_gain_label_values(height, width, labels, crop, base, seed, cat_max_ratio):
    rng = np.random.default_rng(seed)
    mask = rng.choice(np.array(labels, np.uint8), size=(height, width))
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pipeline = train_transforms(crop_size=crop, base_size=base, cat_max_ratio=cat_max_ratio)
    out = pipeline({"image": image, "mask": mask, "path": "p"}, seed=seed)
    assert out["image"].shape == (3, *crop) and out["mask"].shape == crop
    assert set(out["mask"].unique().tolist()) <= set(labels) | {255}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(height=st.integers(1, 64), width=st.integers(1, 64), with_mask=st.booleans(), seed=st.integers(0, 2**16))
def test_eval_pipeline_keeps_any_shape_and_every_mask_value(height, width, with_mask, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, (height, width), dtype=np.uint8) if with_mask else None
    out = eval_transforms()({"image": image, "mask": mask, "path": "p"})
    assert out["image"].shape == (3, height, width) and out["image"].dtype == torch.float32
    assert torch.isfinite(out["image"]).all()
    if with_mask:
        assert torch.equal(out["mask"], torch.from_numpy(mask.astype(np.int64)))
    else:
        assert out["mask"] is None


def test_train_pipeline_outputs_normalised_tensors_and_is_seeded():
    pipeline = train_transforms(crop_size=48, base_size=64)
    data = sample()
    first, again, other = pipeline(data, seed=7), pipeline(data, seed=7), pipeline(data, seed=8)
    assert first["image"].dtype == torch.float32 and first["image"].shape == (3, 48, 48)
    assert first["mask"].dtype == torch.int64 and first["mask"].shape == (48, 48)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(first["image"], other["image"])
    assert first["path"] == "x.png"


def test_eval_pipeline_only_normalises_at_full_resolution():
    data = sample(37, 53)
    out = eval_transforms()(data)
    expected = (data["image"] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert out["image"].shape == (3, 37, 53)
    np.testing.assert_allclose(out["image"].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert torch.equal(out["mask"], torch.from_numpy(data["mask"].astype(np.int64)))


def test_crop_avoids_windows_dominated_by_one_class():
    mask = np.zeros((200, 200), np.uint8)
    mask[:, 120:] = 1
    data = {"image": np.zeros((200, 200, 3), np.uint8), "mask": mask, "path": "p"}

    def dominated(cat_max_ratio):
        """How many of 40 crops have one class on at least 75 % of their pixels."""
        pipeline = train_transforms(crop_size=64, base_size=200, scale_range=(1.0, 1.0),
                                    cat_max_ratio=cat_max_ratio, flip=False, photometric=False)
        masks = [pipeline(data, seed=s)["mask"] for s in range(40)]
        return sum(torch.bincount(m.flatten()).max().item() >= 0.75 * m.numel() for m in masks)

    # A 64-wide window over a border at x=120 is mixed for 33 of 137 offsets: most crops are dominated
    # without the retry (about 76 %), few with up to 10 retries (about 0.76 ** 10 = 6 %).
    assert dominated(1.0) > 20
    assert dominated(0.75) < 8


def test_real_samples_through_the_train_pipeline(shared):
    dataset = build_dataset("ade20k", "val", root=shared("data", "ade20k"),
                            transforms=train_transforms(crop_size=128, base_size=130))
    for index in range(len(dataset)):
        out = dataset[(index, index)]
        stored = set(np.unique(dataset.load(index)["mask"]).tolist())
        assert set(out["mask"].unique().tolist()) <= stored | {255}


def test_the_hue_saturation_shift_of_one_pixel_is_that_of_the_pixel_in_a_larger_image():
    """albumentations' HueSaturationValue crashes on 1 x 1 images; seg's wrapper gives the shift the pixel gets
    inside a larger image."""
    from seg.data.transforms import HueSaturationShift

    shift = HueSaturationShift(p=1.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        pixel = rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)
        params = {"hue_shift": int(rng.integers(-18, 19)), "sat_shift": int(rng.integers(-30, 31)), "val_shift": 0}
        strip = shift.apply(np.repeat(pixel, 3, axis=1), **params)
        assert np.array_equal(shift.apply(pixel, **params), strip[:, :1]), params
