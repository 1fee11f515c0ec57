"""Fuzzing the decoders and the label encoding with hypothesis: random shapes (1 x 1, 1 x N, very thin), modes,
dtypes, values and damaged bytes either decode to what was stored or raise the documented DataError naming the
file; encoded masks only ever hold train ids the label table maps to (plus 255, ignore).

The augmentation pipelines are fuzzed beside their other properties in test_transforms.py. Every test here is
derandomized, so CI runs the same examples each time.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from seg.data import DataError, read_image, read_mask
from seg.data.base import IGNORE_INDEX, SegmentationDataset, label_lookup

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Thin shapes are where rounding and strides break; hypothesis also shrinks towards 1.
sides = st.one_of(st.integers(1, 3), st.integers(1, 48))
MASK_MODES = ["L", "P", "I;16", "LA", "RGB-gray", "RGBA-gray", "1", "RGB-colour"]


def encode(values: np.ndarray, mode: str) -> Image.Image:
    """``values`` (H, W) stored in a PNG of ``mode``."""
    if mode == "P":
        image = Image.fromarray(values.astype(np.uint8), mode="L").convert("P")
        image.putpalette(list(range(256)) * 3)
        image.putdata(values.ravel().tolist())
        return image
    if mode == "I;16":
        return Image.fromarray(values.astype(np.uint16))
    if mode == "LA":
        return Image.fromarray(np.dstack([values, values[::-1, ::-1]]).astype(np.uint8), mode="LA")
    if mode in ("RGB-gray", "RGBA-gray"):
        channels = 3 if mode == "RGB-gray" else 4
        return Image.fromarray(np.repeat(values[..., None], channels, axis=2).astype(np.uint8))
    if mode == "1":
        return Image.fromarray(values.astype(bool))
    if mode == "RGB-colour":
        return Image.fromarray(np.dstack([values, values + 1, values]).astype(np.uint8))
    return Image.fromarray(values.astype(np.uint8))


def value_range(mode: str) -> int:
    return {"1": 2, "I;16": 65536, "RGB-colour": 255}.get(mode, 256)


@FUZZ
@given(height=sides, width=sides, mode=st.sampled_from(MASK_MODES), seed=st.integers(0, 2**16))
def test_masks_read_back_exactly_what_was_stored(tmp_path_factory, height, width, mode, seed):
    values = np.random.default_rng(seed).integers(0, value_range(mode), (height, width))
    path = tmp_path_factory.mktemp("masks") / "mask.png"
    encode(values, mode).save(path)
    if mode == "RGB-colour":  # channels differ: colour-coded masks are refused, by name
        try:
            read_mask(path)
        except DataError as error:
            assert str(error).startswith(f"{path}: colour mask")
            return
        raise AssertionError("a colour-coded mask was accepted")
    mask = read_mask(path)
    assert mask.shape == (height, width)
    assert mask.dtype == (np.int32 if mode == "I;16" else np.uint8)
    assert np.array_equal(mask, values)


def damaged(encoded: bytes, cut: int, flips: list) -> bytes:
    """``encoded`` truncated to ``cut`` bytes with the bytes at ``flips`` (positions, values) overwritten."""
    data = bytearray(encoded[: max(0, cut)])
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    return bytes(data)


# Fewer examples: a flipped byte in a JPEG's frame header can declare tens of megapixels, slow to decode.
@settings(FUZZ, max_examples=60)
@given(height=sides, width=sides, encoder=st.sampled_from(["PNG", "JPEG"]), cut=st.integers(0, 2000),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4), seed=st.integers(0, 99))
def test_damaged_files_decode_or_raise_data_error(tmp_path_factory, height, width, encoder, cut, flips, seed):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, encoder)
    path = tmp_path_factory.mktemp("damaged") / f"file.{encoder.lower()}"
    path.write_bytes(damaged(buffer.getvalue(), cut, flips))
    for read, shape in ((read_image, (height, width, 3)), (read_mask, None)):
        try:
            decoded = read(path)
        except DataError as error:
            assert str(error).startswith(f"{path}: ")
            continue
        # Decoding may "succeed" on a damaged file (the flips can hit pixel data only); the result still has the
        # documented type, and a header left intact keeps its size.
        assert decoded.dtype in (np.uint8, np.int32)
        if shape is not None:
            assert decoded.ndim == 3 and decoded.shape[2] == 3


@FUZZ
@given(
    height=sides, width=sides,
    mapping=st.dictionaries(st.integers(0, 255), st.one_of(st.integers(0, 149), st.just(IGNORE_INDEX)),
                            min_size=1, max_size=12),
    stored_dtype=st.sampled_from([np.uint8, np.int32]),
    seed=st.integers(0, 2**16),
)
def test_label_encoding_maps_or_names_the_bad_values(height, width, mapping, stored_dtype, seed):
    rng = np.random.default_rng(seed)
    valid = np.array(sorted(mapping), dtype=np.int64)
    # Mostly valid values, some arbitrary ones (negative and beyond 255 too, as 16-bit files can hold).
    stored = rng.choice(valid, size=(height, width))
    if rng.random() < 0.5:
        low, high = (0, 256) if stored_dtype == np.uint8 else (-3, 70_000)
        stored[rng.random((height, width)) < 0.2] = rng.integers(low, high)
    stored = stored.astype(stored_dtype)
    dataset = SegmentationDataset("fuzz", "train", [], [f"c{i}" for i in range(150)], label_lookup(256, mapping))
    path = Path("masks/x.png")
    invalid = sorted(set(np.unique(stored).tolist()) - set(mapping))
    try:
        encoded = dataset.encode_mask(stored, path)
    except DataError as error:
        assert invalid, f"valid values refused: {error}"
        assert str(error).startswith(f"{path}: label values {invalid[0]}") and "outside fuzz's range" in str(error)
        return
    assert not invalid, f"values {invalid} were accepted"
    assert encoded.dtype == np.uint8 and encoded.shape == (height, width)
    expected = {mapping[value] for value in np.unique(stored).tolist()}
    assert set(np.unique(encoded).tolist()) == expected  # nothing gained, nothing lost
    assert np.array_equal(encoded, np.vectorize(mapping.get)(stored).astype(np.uint8))
