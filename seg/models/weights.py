"""Published weights: where they live, how to fetch them safely, and how to load them into ``seg`` models.

``load_pretrained(model, source)`` takes a registered name (downloaded once into torch.hub's cache and checked
against its published hash), a local file (``.pth``/``.pt``, or timm's ``.safetensors``) or a state dict. Files
are read with ``torch.load(weights_only=True)``: a checkpoint never runs code. Layouts are recognised from the
keys: the official ResNeSt and timm files (identical keys), torchvision's ResNet, PyTorch-Encoding's
DeepLab/FCN checkpoints (``pretrained.`` / ``head.`` / ``auxlayer.``), ``seg``'s own, and wrappers around them
(``state_dict``/``model`` entries, ``module.`` from DDP, ``_orig_mod.`` from torch.compile).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import urllib.error
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn

StateDict = Dict[str, torch.Tensor]
WeightsSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


class PretrainedWeightsError(RuntimeError):
    """Weights could not be fetched, read, or fitted to the model; the message says which and why."""


@dataclass(frozen=True)
class PublishedWeights:
    """A released weights file.

    Attributes:
        url: where it is published.
        architecture: the registered backbone (``resnest50``) or ``segmentor:backbone`` (``deeplabv3:resnest50``).
        sha256_prefix: leading hex digits of the file's sha256, as in torch.hub file names.
        sha1: full sha1 of the ``.pth`` inside a PyTorch-Encoding ``.zip`` release.
        num_classes: classifier width (1000 for ImageNet, 150 for ADE20K).
    """

    url: str
    architecture: str
    sha256_prefix: Optional[str] = None
    sha1: Optional[str] = None
    num_classes: int = 1000


_RESNEST_RELEASE = "https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/{}-{}.pth"
_TIMM_RELEASE = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/{}-{}.pth"
_TORCHVISION = "https://download.pytorch.org/models/{}-{}.pth"
_ENCODING = "https://s3.us-west-1.wasabisys.com/encoding/models/{}-{}.zip"


def _resnest(name: str, sha: str) -> PublishedWeights:
    return PublishedWeights(_RESNEST_RELEASE.format(name, sha), name, sha256_prefix=sha)


def _encoding_deeplab(backbone: str, sha1: str) -> PublishedWeights:
    name = f"deeplab_{backbone}_ade"
    return PublishedWeights(
        _ENCODING.format(name, sha1[:8]), f"deeplabv3:{backbone}", sha1=sha1, num_classes=150
    )


PUBLISHED_WEIGHTS: Dict[str, PublishedWeights] = {
    # Official ResNeSt ImageNet weights (also what timm's resnest50d/101e/200e/269e serve).
    "resnest50": _resnest("resnest50", "528c19ca"),
    "resnest101": _resnest("resnest101", "22405ba7"),
    "resnest200": _resnest("resnest200", "75117900"),
    "resnest269": _resnest("resnest269", "0cc87c48"),
    "resnest50_fast_1s1x64d": _resnest("resnest50_fast_1s1x64d", "d8fbf808"),
    "resnest50_fast_2s1x64d": _resnest("resnest50_fast_2s1x64d", "44938639"),
    "resnest50_fast_4s1x64d": _resnest("resnest50_fast_4s1x64d", "f74f3fc3"),
    "resnest50_fast_1s2x40d": _resnest("resnest50_fast_1s2x40d", "32830b84"),
    "resnest50_fast_2s2x40d": _resnest("resnest50_fast_2s2x40d", "9d126481"),
    "resnest50_fast_4s2x40d": _resnest("resnest50_fast_4s2x40d", "41d14ed0"),
    "resnest50_fast_1s4x24d": _resnest("resnest50_fast_1s4x24d", "d4a4f76f"),
    # GluonCV ResNeSt-14/26, converted by timm.
    "resnest14": PublishedWeights(_TIMM_RELEASE.format("gluon_resnest14", "9c8fe254"), "resnest14", "9c8fe254"),
    "resnest26": PublishedWeights(_TIMM_RELEASE.format("gluon_resnest26", "50eb607c"), "resnest26", "50eb607c"),
    # torchvision's ImageNet ResNets (V1 weights, as torchvision's own DeepLabV3 backbones use).
    "resnet50": PublishedWeights(_TORCHVISION.format("resnet50", "0676ba61"), "resnet50", "0676ba61"),
    "resnet101": PublishedWeights(_TORCHVISION.format("resnet101", "63fe2227"), "resnet101", "63fe2227"),
    # PyTorch-Encoding's DeepLabV3 ADE20K models from the paper (45.12 / 46.91 mIoU for 50 / 101).
    "deeplab_resnest50_ade": _encoding_deeplab("resnest50", "2225f09d0f40b9a168d9091652194bc35ec2a5a9"),
    "deeplab_resnest101_ade": _encoding_deeplab("resnest101", "06ca799c8cc148fe0fafb5b6d052052935aa3cc8"),
    "deeplab_resnest200_ade": _encoding_deeplab("resnest200", "7b9e7d3e6f0e2c763c7d77cad14d306c0a31fe05"),
    "deeplab_resnest269_ade": _encoding_deeplab("resnest269", "0074dd10a6e6696f6f521653fb98224e75955496"),
}


def list_published_weights() -> List[str]:
    """Names accepted by :func:`load_pretrained` and ``pretrained=`` arguments."""
    return sorted(PUBLISHED_WEIGHTS)


# --- fetching -----------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, destination: Path, sha256_prefix: Optional[str], progress: bool) -> None:
    try:
        # Downloads to a temporary name, checks the sha256 prefix, then renames: no partial file is ever cached.
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=sha256_prefix, progress=progress)
    except (urllib.error.URLError, OSError) as error:
        raise PretrainedWeightsError(
            f"could not download {url} ({error}); without network, use a local weights file instead "
            f"(pretrained=PATH) or start from random weights (pretrained=none; None in code)"
        ) from None
    except RuntimeError as error:  # torch.hub's hash mismatch
        raise PretrainedWeightsError(f"{url}: {error}") from None


def _extract_single_member(archive: Path, member_name: str, destination: Path) -> None:
    """Copy one regular file named exactly ``member_name`` out of a zip; no paths, links or other entries."""
    with zipfile.ZipFile(archive) as bundle:
        entries = {info.filename: info for info in bundle.infolist()}
        info = entries.get(member_name)
        if info is None or info.is_dir() or (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
            raise PretrainedWeightsError(f"{archive} does not hold a regular file named {member_name}")
        tmp = destination.with_name(destination.name + ".partial")
        with bundle.open(info) as source, open(tmp, "wb") as target:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp, destination)


def download_published_weights(name: str, progress: bool = True) -> Path:
    """Path of the registered weights ``name`` in torch.hub's cache, downloading and verifying them if needed."""
    if name not in PUBLISHED_WEIGHTS:
        raise ValueError(f"unknown published weights {name!r}; choose one of: {', '.join(list_published_weights())}")
    spec = PUBLISHED_WEIGHTS[name]
    cache = _cache_dir()
    filename = Path(urlparse(spec.url).path).name
    if spec.sha1 is None:
        path = cache / filename
        if not path.exists():
            _fetch(spec.url, path, spec.sha256_prefix, progress)
        return path

    # PyTorch-Encoding releases a zip holding "<name>-<sha1[:8]>.pth"; the sha1 is of that .pth.
    path = cache / (Path(filename).stem + ".pth")
    if path.exists() and _sha1(path) == spec.sha1:
        return path
    archive = cache / filename
    _fetch(spec.url, archive, None, progress)
    try:
        _extract_single_member(archive, path.name, path)
    finally:
        archive.unlink(missing_ok=True)
    if _sha1(path) != spec.sha1:
        path.unlink(missing_ok=True)
        raise PretrainedWeightsError(f"{spec.url}: the extracted {path.name} does not have sha1 {spec.sha1}")
    return path


# --- reading ------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Union[str, os.PathLike]) -> StateDict:
    """Read a ``.safetensors`` file (the format timm's weights are published in) without extra dependencies.

    The format is an 8-byte little-endian header length, a JSON header of {name: dtype, shape, offsets}, and raw
    little-endian tensor bytes: plain data, nothing executable.
    """
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise PretrainedWeightsError(f"{path} is not a safetensors file: it is only {len(data)} bytes")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise PretrainedWeightsError(f"{path} is not a safetensors file: its header runs past the end")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except ValueError:
        raise PretrainedWeightsError(f"{path} is not a safetensors file: its header is not JSON") from None
    body = memoryview(data)[8 + header_size :]
    tensors: StateDict = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise PretrainedWeightsError(f"{path}: tensor {key} has unsupported dtype {entry.get('dtype')}")
        start, end = entry["data_offsets"]
        shape = entry["shape"]
        raw = bytearray(body[start:end])
        tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[key] = tensor.reshape(shape)
    return tensors


def read_weights_file(path: Union[str, os.PathLike]) -> Mapping[str, object]:
    """Read a weights or checkpoint file safely (never unpickling arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not a loadable weights file"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PretrainedWeightsError(
            f"{path} is not a readable weights file (read with weights_only=True, which refuses pickled "
            f"code): {first_line}"
        ) from None
    if not isinstance(loaded, Mapping):
        raise PretrainedWeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def _unwrap(checkpoint: Mapping[str, object]) -> StateDict:
    """The tensors of a state dict, looking inside the usual checkpoint wrappers."""
    for wrapper in ("model", "state_dict", "model_state"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            checkpoint = inner
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise PretrainedWeightsError("the weights hold no tensors")
    for prefix in ("module.", "_orig_mod."):
        if all(key.startswith(prefix) for key in tensors):
            tensors = {key[len(prefix) :]: value for key, value in tensors.items()}
    return tensors


# --- fitting to a model -------------------------------------------------------------------------------------

# PyTorch-Encoding -> seg segmentor prefixes; the heads below them share Encoding's names.
_ENCODING_PREFIXES = {"pretrained.": "backbone.", "auxlayer.": "aux_head.", "head.": "head."}
_CLASSIFIER_PREFIXES = ("fc.", "head.block.4.", "head.conv5.4.", "aux_head.conv5.4.")


def _is_segmentor(model: nn.Module) -> bool:
    return hasattr(model, "backbone") and hasattr(model, "head")


def convert_state_dict(state: StateDict, model: nn.Module) -> StateDict:
    """Rename ``state`` (any supported layout) to ``model``'s keys. Backbone-only weights fit a segmentor's
    backbone; the ImageNet classifier is dropped for models that have none."""
    if _is_segmentor(model):
        if any(key.startswith("pretrained.") for key in state):
            renamed = {}
            for key, value in state.items():
                prefix = next((p for p in _ENCODING_PREFIXES if key.startswith(p)), None)
                if prefix is None:
                    raise PretrainedWeightsError(f"unexpected key {key!r} in a PyTorch-Encoding checkpoint")
                renamed[_ENCODING_PREFIXES[prefix] + key[len(prefix) :]] = value
            state = renamed
        elif not any(key.startswith("backbone.") for key in state):
            backbone_state = convert_state_dict(state, model.backbone)
            return {"backbone." + key: value for key, value in backbone_state.items()}
    elif getattr(model, "fc", "absent") is None:
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    return state


def _summarise(kind: str, keys: List[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{kind} ({len(keys)}): {shown}"


def fit_state_dict(model: nn.Module, state: StateDict, reset_classifier: bool = False, origin: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly, or raise naming every missing, unexpected and misshapen key.

    With ``reset_classifier``, final classifier layers whose shape differs (another number of classes) are left
    at their initial values instead of failing.
    """
    own = model.state_dict()
    if reset_classifier:
        state = {
            key: value
            for key, value in state.items()
            if not (key.startswith(_CLASSIFIER_PREFIXES) and key in own and own[key].shape != value.shape)
        }
    required = {key for key in own if not key.endswith("num_batches_tracked")}
    missing = sorted(required - state.keys())
    if reset_classifier:
        missing = [key for key in missing if not key.startswith(_CLASSIFIER_PREFIXES)]
    unexpected = sorted(state.keys() - own.keys())
    misshapen = sorted(
        f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and own[key].shape != value.shape
    )
    problems = [
        _summarise(kind, keys)
        for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshapen))
        if keys
    ]
    if problems:
        raise PretrainedWeightsError(f"{origin} do not fit {type(model).__name__}: " + "; ".join(problems))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_state_dict(state, strict=not reset_classifier)


def load_pretrained(
    model: nn.Module,
    source: WeightsSource,
    reset_classifier: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Load published or local weights into ``model`` (in place) and return it.

    Args:
        model: a backbone from ``build_backbone`` or a segmentor from ``build_segmentor``.
        source: a registered name (see :func:`list_published_weights`), a file path, or a state dict. Layouts:
            official ResNeSt, timm, torchvision ResNet, PyTorch-Encoding DeepLab/FCN, ``seg`` checkpoints.
        reset_classifier: tolerate a classifier of another number of classes (it keeps its initial values).
        progress: show a download progress bar.

    Raises:
        PretrainedWeightsError: the weights cannot be fetched or read, or do not fit (the message lists the
            missing, unexpected and misshapen keys).
    """
    if isinstance(source, Mapping):
        origin, checkpoint = "the given state dict", source
    elif str(source) in PUBLISHED_WEIGHTS:
        path = download_published_weights(str(source), progress=progress)
        origin, checkpoint = f"published weights {source}", read_weights_file(path)
    else:
        origin, checkpoint = f"weights file {source}", read_weights_file(source)
    state = convert_state_dict(_unwrap(checkpoint), model)
    fit_state_dict(model, state, reset_classifier=reset_classifier, origin=origin)
    return model

