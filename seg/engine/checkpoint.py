"""Checkpoints that survive crashes: written to a temporary file, fsynced, then renamed over the old one, so a
kill at any moment leaves the previous checkpoint intact; read back with ``weights_only=True``."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import numpy as np
import torch

CHECKPOINT_FORMAT = "seg-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and why."""


def save_checkpoint(payload: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Atomically write ``payload`` (tensors and plain Python values) to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror or error}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a ``seg`` checkpoint (never unpickling code); CheckpointError if it is missing, damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable seg checkpoint (loaded with weights_only=True): {reason}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a seg checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return payload


def rng_state() -> Dict[str, Any]:
    """The Python, NumPy and torch RNG states as checkpoint-safe values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_from_checkpoint(payload: Mapping[str, Any]) -> torch.nn.Module:
    """Rebuild the segmentor a ``seg`` checkpoint describes and load its weights (eval mode, on the CPU)."""
    from seg.models import build_segmentor  # the engine sits above the models; imported here to keep this light

    spec = dict(payload["model_config"])
    model = build_segmentor(spec.pop("segmentor"), **spec)
    model.load_state_dict(payload["model"])
    return model.eval()
