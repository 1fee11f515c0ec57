"""Checkpoints that survive crashes and are verified when read.

Writing: to a temporary file beside the target, fsynced, then renamed over the old one, so a kill at any moment
leaves the previous checkpoint intact (at worst a ``.<name>.*.tmp`` file stays behind; the next save removes it).
Reading: ``weights_only=True``, after checking every entry of torch's zip container against the CRC-32 torch
recorded when writing it. torch itself notices only a file cut before its central directory, not a damaged
entry (a truncated copy that happens to end on a record boundary, a flipped bit), and would load those silently.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from seg.card import CardMetrics, ModelCard, ModelCardError
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CHECKPOINT_FORMAT = "seg-checkpoint-v1"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container; older non-zip files carry no checksums to verify


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and why."""


def describe(error: OSError) -> str:
    """The reason of an OSError without its errno number, e.g. 'No space left on device'."""
    return error.strerror or str(error) or type(error).__name__


def remove_partial_checkpoints(directory: Union[str, os.PathLike], name: Optional[str] = None) -> None:
    """Delete the temporary files that saves of ``name`` (default: any ``*.pth``) killed before their rename left
    in ``directory``; they are never loaded, only cleaned up."""
    pattern = f".{glob.escape(name)}.*.tmp" if name else ".*.pth.*.tmp"
    for leftover in Path(directory).glob(pattern):
        leftover.unlink(missing_ok=True)


def ensure_writable_directory(directory: Union[str, os.PathLike], label: str = "directory") -> None:
    """Create ``directory`` if needed and prove a file can be written there; CheckpointError if not, naming it as
    ``label`` (e.g. the flag that chose it).

    Run before training starts, so an unwritable ``--output-dir`` fails in a second rather than at the first save.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{label} {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(f"{label} {directory} is not writable: {describe(error)}") from None


class _WriteErrorRecorder:
    """Passes writes through to ``handle`` and remembers the first OSError: torch.save reports a failed write as
    an opaque RuntimeError ("unexpected pos ..."), and the real reason (a full disk) is what people need."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


@contextlib.contextmanager
def _crc32_recorded() -> Iterator[None]:
    """torch.save with CRC-32s computed (torch can be told to skip them), since :func:`load_checkpoint` checks them."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None or get():
        yield
        return
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(False)


def save_checkpoint(payload: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Atomically write ``payload`` (tensors and plain Python values) to ``path``.

    On any failure (a full disk, a read-only folder) raises CheckpointError naming ``path`` and the reason; the
    previous file at ``path`` is untouched and no temporary file is left behind.
    """
    path = Path(path)
    kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(path.parent, path.name)  # an earlier save of this file that was killed
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoint {path}: {describe(error)}{kept}") from None
    writer: Optional[_WriteErrorRecorder] = None
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = _WriteErrorRecorder(handle)
            with _crc32_recorded():
                torch.save({"format": CHECKPOINT_FORMAT, **payload}, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except (OSError, RuntimeError) as error:
        Path(tmp).unlink(missing_ok=True)
        recorded = writer.error if writer is not None else None
        if isinstance(error, RuntimeError) and recorded is None:
            raise  # not an I/O failure: a bug, keep its traceback
        reason = describe(recorded or error)  # type: ignore[arg-type]
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}{kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def verify_archive(path: Path) -> None:
    """Check every entry of a zip-format torch file against its recorded CRC-32; CheckpointError if damaged."""
    with open(path, "rb") as handle:
        if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return  # not a zip container: torch.load decides (and refuses anything but plain data)
    try:
        with zipfile.ZipFile(path) as archive:
            bad_entry = archive.testzip()  # reads every entry; None when all CRC-32s match
        problem = None if bad_entry is None else f"entry {bad_entry} fails its CRC-32 check"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError) as error:
        problem = f"broken zip structure: {error}"
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {describe(error)}") from None
    if problem is not None:
        raise CheckpointError(f"{path} is damaged ({problem}): truncated or corrupted, e.g. by an interrupted "
                              f"copy; use another copy")


def load_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a ``seg`` checkpoint (never unpickling code) after verifying its checksums; CheckpointError if it is
    missing, damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify_archive(path)
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


def checkpoint_card(payload: Mapping[str, Any], source: Union[str, os.PathLike] = "checkpoint") -> ModelCard:
    """The model card of a loaded ``seg`` checkpoint ``payload``; ModelCardError naming ``source`` if malformed.

    Checkpoints written before the card (seg 0.1.0 up to issue 16) described the model with loose keys
    (``model_config``, ``classes``, ``palette``, ``normalisation``, ``dataset`` and the training ``config``); they
    are migrated to a card here, the one place that knows that older layout.
    """
    if "card" in payload:
        return ModelCard.from_dict(payload["card"], source=str(source))
    return _card_of_pre_card_checkpoint(payload, str(source))


def _card_of_pre_card_checkpoint(payload: Mapping[str, Any], source: str) -> ModelCard:
    from .inference import test_scales_for  # the engine's inference module imports the models; keep this light

    missing = [key for key in ("model_config", "classes", "palette") if key not in payload]
    if missing:
        raise ModelCardError(f"{source}: neither a model card nor the older model_config/classes/palette keys "
                             f"(missing {', '.join(missing)})")
    spec = dict(payload["model_config"])
    config = payload.get("config", {})
    normalisation = payload.get("normalisation", {})
    dataset = payload.get("dataset", config.get("dataset", ""))
    try:
        return ModelCard(
            segmentor=spec.pop("segmentor", "deeplabv3"), backbone=spec.pop("backbone"),
            num_classes=spec.pop("num_classes"), output_stride=spec.pop("output_stride", 8),
            aux=spec.pop("aux", True), backbone_args=spec, classes=payload["classes"], palette=payload["palette"],
            mean=normalisation.get("mean", IMAGENET_MEAN), std=normalisation.get("std", IMAGENET_STD),
            dataset=dataset, crop_size=config.get("crop_size", 512), base_size=config.get("base_size"),
            test_scales=test_scales_for(dataset), seg_version="0.1.0 (before model cards)",
        )
    except KeyError as error:
        raise ModelCardError(f"{source}: model_config lacks {error.args[0]!r}") from None
    except (ModelCardError, TypeError, ValueError) as error:
        raise ModelCardError(f"{source}: {error}") from None


def model_from_card(card: ModelCard, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                    source: str = "weights") -> torch.nn.Module:
    """The network ``card`` describes (eval mode, on the CPU), with ``state_dict`` loaded when given;
    ModelCardError naming ``source`` when the weights do not fit the card (another class count, another
    backbone)."""
    from seg.models import build_segmentor  # the engine sits above the models; imported here to keep this light

    model = build_segmentor(**card.builder_arguments())
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            mismatch = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
            shown = "; ".join(mismatch[:3]) + ("; ..." if len(mismatch) > 3 else "")
            raise ModelCardError(f"{source}: the weights do not fit the card's {card.segmentor}-{card.backbone} "
                                 f"with {card.num_classes} classes ({shown})") from None
    return model.eval()


def model_from_checkpoint(payload: Mapping[str, Any], source: Union[str, os.PathLike] = "checkpoint"
                          ) -> torch.nn.Module:
    """Rebuild the segmentor a ``seg`` checkpoint's card describes and load its weights (eval mode, CPU)."""
    return model_from_card(checkpoint_card(payload, source), payload["model"], str(source))


# ==================================================================================================================
# The training checkpoint: what seg.engine.trainer writes into last.pth / best.pth and what resuming restores.
#
# A training checkpoint is the model card (everything inference needs: see seg.card) plus the training state, which
# is everything that decides the next optimizer step, so that a killed run resumed from it ends with the weights of
# an uninterrupted one: the weights, the optimiser, lr schedule and grad-scaler states, the iteration (which fixes
# the position in the epoch), every rank's RNG states, the best validation mIoU, the skipped files already
# reported, the logged history and the resolved training config.
# ==================================================================================================================

# The keys of a training checkpoint besides ``card`` (and ``format``, which save_checkpoint adds).
TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "iteration", "rng", "best_miou", "skipped_files",
                       "history", "config")


@dataclass
class TrainingProgress:
    """Where a run stands, besides its weights and optimiser: what :func:`restore_training_checkpoint` returns.

    Attributes:
        iteration: optimizer steps taken.
        best_miou: the best validation mIoU so far (-1 before the first validation).
        history: ``{"loss": [(iteration, value), ...], "lr": [...], "val mIoU": [...]}`` for the curves.
        skipped_files: the replaced unreadable files already reported (skip_bad_samples).
        metrics: the checkpoint card's metrics (its latest validation), () when it has none.
    """

    iteration: int = 0
    best_miou: float = -1.0
    history: Dict[str, List[Tuple[float, float]]] = field(
        default_factory=lambda: {"loss": [], "lr": [], "val mIoU": []})
    skipped_files: List[str] = field(default_factory=list)
    metrics: Tuple[CardMetrics, ...] = ()


def every_rank_rng_state(world_size: int) -> List[Dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective when ``world_size`` > 1: every rank calls it)."""
    if world_size == 1:
        return [rng_state()]
    states: List[Any] = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


def training_checkpoint(*, card: ModelCard, model: torch.nn.Module, optimizer, scheduler, scaler, iteration: int,
                        rng: Sequence[Mapping[str, Any]], best_miou: float, skipped_files: Sequence[str],
                        history: Mapping[str, Sequence[Tuple[float, float]]], config: Mapping[str, Any]
                        ) -> Dict[str, Any]:
    """The payload of a training checkpoint (for :func:`save_checkpoint`): ``card`` as a dictionary, then the
    training state (``rng``: :func:`every_rank_rng_state`; ``config``: the resolved training config's dictionary)."""
    return {
        "card": card.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "iteration": iteration,
        "rng": list(rng),
        "best_miou": best_miou,
        "skipped_files": list(skipped_files),
        "history": {k: [list(p) for p in v] for k, v in history.items()},
        "config": dict(config),
    }


def scheduled_iterations(payload: Mapping[str, Any]) -> int:
    """The run length a training checkpoint was scheduled for (its config's ``iters``)."""
    return int(payload["config"]["iters"])


def restore_training_checkpoint(payload: Mapping[str, Any], *, model: torch.nn.Module, optimizer, scheduler, scaler,
                                rank: int, world_size: int, source: Union[str, os.PathLike] = "checkpoint"
                                ) -> TrainingProgress:
    """Load a training checkpoint's state into ``model``, ``optimizer``, ``scheduler`` and ``scaler`` (built for
    the same run), restore this rank's RNG states (when the checkpoint has one per rank of this world size, else
    they stay as they are), and return the rest of the run's state."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    states = payload["rng"]
    if len(states) == world_size:
        restore_rng_state(states[rank])
    metrics = checkpoint_card(payload, source).metrics  # () for a checkpoint written before the card
    return TrainingProgress(
        iteration=int(payload["iteration"]), best_miou=float(payload["best_miou"]),
        history={k: [tuple(p) for p in v] for k, v in payload["history"].items()},
        skipped_files=list(payload.get("skipped_files", [])), metrics=metrics,
    )
