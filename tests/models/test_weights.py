"""load_pretrained: published names (download code run against local file:// releases), files, state dicts,
layout detection, clear mismatch errors, and refusal to unpickle code."""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from seg.models import PretrainedWeightsError, build_backbone, build_segmentor, load_pretrained
from seg.models import weights as weights_module
from seg.models.weights import PublishedWeights, download_published_weights, read_safetensors


@pytest.fixture(autouse=True)
def isolated_hub_cache(tmp_path, monkeypatch):
    """torch.hub's cache in a fresh folder, so tests neither read nor fill the user's cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def tiny_weights(num_classes: int = 1000):
    return build_backbone("resnest14", num_classes=num_classes).state_dict()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish(monkeypatch, name: str, spec: PublishedWeights) -> None:
    monkeypatch.setitem(weights_module.PUBLISHED_WEIGHTS, name, spec)


def assert_same_weights(model, state):
    own = model.state_dict()
    for key, value in state.items():
        if key in own:
            assert torch.equal(own[key], value), key


def test_registered_name_downloads_once_into_the_hub_cache_with_hash_checked(tmp_path, monkeypatch, isolated_hub_cache):
    release = tmp_path / "release" / "resnest14-x.pth"
    release.parent.mkdir()
    state = tiny_weights()
    torch.save(state, release)
    publish(monkeypatch, "resnest14", PublishedWeights(release.as_uri(), "resnest14", sha256(release)[:8]))

    model = load_pretrained(build_backbone("resnest14"), "resnest14", progress=False)
    assert_same_weights(model, state)
    cached = isolated_hub_cache / release.name
    assert cached.is_file()

    release.unlink()  # the second load must come from the cache, not the network
    assert download_published_weights("resnest14", progress=False) == cached
    assert_same_weights(build_backbone("resnest14", pretrained="resnest14"), state)


def test_hash_mismatch_fails_and_caches_nothing(tmp_path, monkeypatch, isolated_hub_cache):
    release = tmp_path / "resnest14-bad.pth"
    torch.save(tiny_weights(), release)
    publish(monkeypatch, "resnest14", PublishedWeights(release.as_uri(), "resnest14", "00000000"))
    with pytest.raises(PretrainedWeightsError, match="hash"):
        load_pretrained(build_backbone("resnest14"), "resnest14", progress=False)
    assert not (isolated_hub_cache / release.name).exists()


def test_unreachable_release_names_both_alternatives(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "resnest14-x.pth"
    publish(monkeypatch, "resnest14", PublishedWeights(missing.as_uri(), "resnest14", "12345678"))
    with pytest.raises(PretrainedWeightsError, match="local weights file.*pretrained=none"):
        build_backbone("resnest14", pretrained="resnest14")


def _encoding_release(tmp_path: Path, state, name: str = "deeplab_resnest14_ade"):
    pth = tmp_path / "build" / f"{name}-0000.pth"
    pth.parent.mkdir(exist_ok=True)
    torch.save(state, pth)
    sha1 = hashlib.sha1(pth.read_bytes()).hexdigest()
    member = f"{name}-{sha1[:8]}.pth"
    archive = tmp_path / "release" / f"{name}-{sha1[:8]}.zip"
    archive.parent.mkdir(exist_ok=True)
    return pth, sha1, member, archive


def test_encoding_zip_release_is_extracted_verified_and_loaded(tmp_path, monkeypatch, isolated_hub_cache):
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=150)
    encoding_state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in (("backbone.", "pretrained."), ("aux_head.", "auxlayer."), ("head.", "head.")):
            if key.startswith(ours):
                encoding_state[theirs + key[len(ours):]] = torch.randn_like(value.float()).to(value.dtype)
    pth, sha1, member, archive = _encoding_release(tmp_path, encoding_state)
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(pth, member)
    publish(monkeypatch, "deeplab_resnest14_ade", PublishedWeights(archive.as_uri(), "deeplabv3:resnest14", sha1=sha1))

    fresh = build_segmentor("deeplabv3", backbone="resnest14", num_classes=150, pretrained="deeplab_resnest14_ade")
    assert torch.equal(fresh.head.block[4].weight, encoding_state["head.block.4.weight"])
    assert torch.equal(fresh.backbone.conv1[0].weight, encoding_state["pretrained.conv1.0.weight"])
    assert (isolated_hub_cache / member).is_file()
    assert not (isolated_hub_cache / archive.name).exists()  # the zip is removed after extraction


@pytest.mark.parametrize("hostile_member", ["../escape.pth", "/abs/escape.pth", "nested/dir/escape.pth"])
def test_encoding_zip_with_unexpected_members_is_refused(tmp_path, monkeypatch, isolated_hub_cache, hostile_member):
    pth, sha1, member, archive = _encoding_release(tmp_path, {"x": torch.zeros(1)})
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(pth, hostile_member)
    publish(monkeypatch, "deeplab_resnest14_ade", PublishedWeights(archive.as_uri(), "deeplabv3:resnest14", sha1=sha1))
    with pytest.raises(PretrainedWeightsError, match=f"regular file named {member}"):
        download_published_weights("deeplab_resnest14_ade", progress=False)
    assert not (tmp_path / "escape.pth").exists()
    assert [p.name for p in isolated_hub_cache.iterdir()] == []


def test_unknown_published_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown published weights 'resnest51'.*resnest50"):
        download_published_weights("resnest51")


def test_wrapped_and_prefixed_checkpoints_are_recognised(tmp_path):
    state = tiny_weights()
    variants = {
        "plain.pth": state,
        "ddp.pth": {"module." + k: v for k, v in state.items()},
        "wrapped.pth": {"state_dict": state, "epoch": 3},
        "seg.pth": {"model": {"_orig_mod." + k: v for k, v in state.items()}, "iteration": 10},
    }
    for filename, content in variants.items():
        path = tmp_path / filename
        torch.save(content, path)
        assert_same_weights(load_pretrained(build_backbone("resnest14"), path), state)


def write_safetensors(path: Path, state) -> None:
    """Independent writer of the safetensors layout (8-byte header length, JSON header, raw bytes)."""
    header, blobs, offset = {}, [], 0
    names = {torch.float32: "F32", torch.int64: "I64"}
    for key, value in state.items():
        data = value.contiguous().numpy().tobytes()
        span = [offset, offset + len(data)]
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape), "data_offsets": span}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_timm_safetensors_files_load(tmp_path):
    state = tiny_weights()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, state)
    read = read_safetensors(path)
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    assert_same_weights(load_pretrained(build_backbone("resnest14"), path), state)


def test_truncated_safetensors_is_refused_clearly(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(PretrainedWeightsError, match="broken.safetensors.*header runs past the end"):
        read_safetensors(path)


def test_mismatch_names_missing_unexpected_and_misshapen_keys():
    state = tiny_weights()
    state.pop("layer1.0.conv1.weight")
    state["layer9.weight"] = torch.zeros(1)
    state["bn1.weight"] = torch.zeros(3)
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained(build_backbone("resnest14"), state)
    message = str(error.value)
    assert "missing keys (1): layer1.0.conv1.weight" in message
    assert "unexpected keys (1): layer9.weight" in message
    assert "bn1.weight (3,) vs model (64,)" in message
    assert "\n" not in message


def test_other_architecture_is_refused():
    with pytest.raises(PretrainedWeightsError, match="missing keys"):
        load_pretrained(build_backbone("resnest26"), tiny_weights())


def test_classifier_of_another_width_is_reset_only_on_request():
    state = tiny_weights(num_classes=1000)
    with pytest.raises(PretrainedWeightsError, match="fc.weight"):
        load_pretrained(build_backbone("resnest14", num_classes=10), state)
    model = build_backbone("resnest14", num_classes=10, pretrained=state)  # fine-tuning: reset the classifier
    assert model.fc.weight.shape == (10, 2048)
    assert torch.equal(model.layer4[0].conv3.weight, state["layer4.0.conv3.weight"])


def test_imagenet_weights_fit_a_feature_extractor_and_a_segmentor_backbone():
    state = tiny_weights()
    assert_same_weights(build_backbone("resnest14", num_classes=0, output_stride=8, pretrained=state), state)
    segmentor = build_segmentor("deeplabv3", backbone="resnest14", num_classes=19, pretrained_backbone=state)
    assert torch.equal(segmentor.backbone.layer3[0].conv2.fc1.weight, state["layer3.0.conv2.fc1.weight"])


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pth"
    torch.save({"conv1.0.weight": torch.zeros(1), "payload": Exploit()}, evil)
    with pytest.raises(PretrainedWeightsError, match="evil.pth.*weights_only=True"):
        load_pretrained(build_backbone("resnest14"), evil)
    with pytest.raises(PretrainedWeightsError):
        build_segmentor("deeplabv3", backbone="resnest14", num_classes=3, pretrained=evil)
    assert not marker.exists()


def test_missing_and_non_weight_files_are_named(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="nope.pth does not exist"):
        load_pretrained(build_backbone("resnest14"), tmp_path / "nope.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="notes.pth is not a readable weights file"):
        load_pretrained(build_backbone("resnest14"), text)
