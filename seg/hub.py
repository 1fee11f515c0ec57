"""Shared models: a folder of ``config.json`` + ``model.safetensors`` + ``README.md``, locally or on the Hub.

The layout is the one timm and segmentation_models_pytorch share models in:

- ``config.json``: the :class:`~seg.card.ModelCard` (plain JSON, checked field by field when read);
- ``model.safetensors``: the weights as trained (safetensors: tensors only, nothing to unpickle);
- ``README.md``: a Hugging Face model card, YAML metadata (``library_name``, ``pipeline_tag``, the dataset, the
  weights' licence, ``model-index`` with the metrics) above a short description.

:func:`read_model` is the one reader behind ``Segmenter.from_checkpoint`` / ``from_pretrained``, ``seg.eval``
and ``seg.export``: it takes a ``seg`` checkpoint file, such a folder, or a Hub repo id (``owner/name``), fetched
through ``huggingface_hub`` (``pip install "seg[hub]"``), which caches it and honours ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from seg.card import ModelCard, ModelCardError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
README_NAME = "README.md"
SHARED_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME)
HUB_EXTRA = 'pip install "seg[hub]"'
LIBRARY_NAME = "seg"

# The Hub's dataset ids for the datasets with a page there (model-index and the `datasets` metadata link to them).
HUB_DATASETS = {"ade20k": "scene_parse_150", "cityscapes": "cityscapes", "camvid": "camvid"}
DATASET_TITLES = {"ade20k": "ADE20K", "cityscapes": "Cityscapes", "camvid": "CamVid", "toy": "seg toy shapes",
                  "folder": "a custom dataset"}

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
SEGMENTOR_TITLES = {"deeplabv3": "DeepLabV3", "fcn": "FCN"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hub repo id (``owner/name``) rather than of a checkpoint file name."""
    return bool(_REPO_ID.match(text)) and Path(text).suffix not in CHECKPOINT_SUFFIXES

PathLike = Union[str, os.PathLike]


class HubError(RuntimeError):
    """A shared model cannot be found, fetched or uploaded; the message says which and why."""


# --- reading ------------------------------------------------------------------------------------------------


def read_model(source: PathLike, revision: Optional[str] = None
               ) -> Tuple[ModelCard, Dict[str, torch.Tensor]]:
    """(card, weights) of a ``seg`` checkpoint file, a shared folder or a Hub repo id.

    Raises CheckpointError (a bad checkpoint file), ModelCardError (a malformed ``config.json``) or HubError (no
    such folder or repo, no network, a missing file), each one line naming the source.
    """
    from seg.engine.checkpoint import checkpoint_card, load_checkpoint

    path = Path(source)
    if path.is_file() or path.suffix in CHECKPOINT_SUFFIXES:  # a missing .pth is a missing file, not a repo id
        payload = load_checkpoint(path)
        return checkpoint_card(payload, path), payload["model"]
    if path.is_dir():
        return read_folder(path)
    if is_repo_id(str(source)) and not path.exists():
        return read_folder(download(str(source), revision))
    if path.exists():
        raise HubError(f"{source} is neither a checkpoint file, a model folder ({CONFIG_NAME} + {WEIGHTS_NAME}) nor "
                       f"a Hub repo id (owner/name)")
    raise HubError(f"{source} does not exist; expected a checkpoint file, a model folder ({CONFIG_NAME} + "
                   f"{WEIGHTS_NAME}) or a Hub repo id (owner/name)")


def read_folder(directory: PathLike) -> Tuple[ModelCard, Dict[str, torch.Tensor]]:
    """The card (``config.json``) and weights (``model.safetensors``) of a shared model folder; anything else in
    it is ignored, so a pickle placed beside them is never opened."""
    directory = Path(directory)
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for required in (config, weights):
        if not required.is_file():
            raise HubError(f"{directory} is not a shared seg model: {required.name} is missing")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelCardError(f"{config}: not valid JSON ({error})") from None
    card = ModelCard.from_dict(data, source=str(config))
    return card, load_safetensors(weights)


def load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, on the CPU (seg's own reader: no extra needed to load a model);
    HubError when the file is damaged."""
    from seg.models.weights import PretrainedWeightsError, read_safetensors

    try:
        return read_safetensors(path)
    except PretrainedWeightsError as error:
        raise HubError(str(error)) from None
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise HubError(f"{path} is not a readable safetensors file: {error}") from None


def download(repo_id: str, revision: Optional[str] = None) -> Path:
    """The local snapshot of a Hub repo's shared files (from huggingface_hub's cache when there; with
    ``HF_HUB_OFFLINE=1`` only from the cache)."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise HubError(f"loading the Hub repo {repo_id} needs huggingface_hub: {HUB_EXTRA}") from None
    at = f" at revision {revision}" if revision else ""
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(SHARED_FILES))
    except LocalEntryNotFoundError:
        raise HubError(f"{repo_id}{at} is not in the Hugging Face cache and the Hub cannot be reached (offline: "
                       f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); download it once with network, "
                       f"or pass a local folder") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such Hub repo (or it is private: log in with huggingface-cli login)") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise HubError(f"cannot fetch {repo_id}{at} from the Hub: {str(error).splitlines()[0]}") from None
    return Path(folder)


# --- writing ------------------------------------------------------------------------------------------------


def save_folder(directory: PathLike, card: ModelCard, weights: Mapping[str, torch.Tensor],
                repo_id: Optional[str] = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` for ``card`` and ``weights`` into
    ``directory`` (created if needed); each file is written to a temporary name and renamed, so an interrupted
    save never leaves a half-written file under the real name. Returns the folder."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise HubError(f"writing {WEIGHTS_NAME} needs safetensors: {HUB_EXTRA}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous tensors that share no memory; CPU copies satisfy both.
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in weights.items()}
    with _replacing(directory / WEIGHTS_NAME) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt", "library": LIBRARY_NAME})
    with _replacing(directory / CONFIG_NAME) as temporary:
        temporary.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    with _replacing(directory / README_NAME) as temporary:
        temporary.write_text(model_card_markdown(card, repo_id), encoding="utf-8")
    return directory


class _replacing:
    """``with _replacing(path) as temporary:`` write ``temporary``; on success it is renamed to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.temporary = Path(name)
        return self.temporary

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            os.replace(self.temporary, self.path)
        else:
            self.temporary.unlink(missing_ok=True)


def push_folder(card: ModelCard, weights: Mapping[str, torch.Tensor], repo_id: str, private: bool = False,
                token: Optional[str] = None, revision: Optional[str] = None,
                commit_message: str = "Upload seg model") -> str:
    """Save the model into a temporary folder and upload it to ``repo_id`` (created if missing); returns the
    commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise HubError(f"push_to_hub needs huggingface_hub: {HUB_EXTRA}") from None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="seg-push-") as scratch:
        save_folder(scratch, card, weights, repo_id=repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=scratch, revision=revision,
                                   commit_message=commit_message, allow_patterns=list(SHARED_FILES))
    return str(getattr(commit, "commit_url", commit))


# --- the README ---------------------------------------------------------------------------------------------


def _yaml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML flow scalar, quotes and escapes included


def model_card_markdown(card: ModelCard, repo_id: Optional[str] = None) -> str:
    """The Hub README: YAML front matter (library, task, dataset, licence, model-index) and a description whose
    example loads ``repo_id`` (default: a placeholder for the folder)."""
    title = DATASET_TITLES.get(card.dataset, card.dataset or "unknown data")
    name = f"{card.segmentor}-{card.backbone}-{card.dataset or 'custom'}"
    lines = ["---", f"library_name: {LIBRARY_NAME}", "pipeline_tag: image-segmentation",
             f"license: {card.license}", "tags:", "- semantic-segmentation", f"- {card.segmentor}",
             f"- {card.backbone}"]
    if card.dataset in HUB_DATASETS:
        lines += ["datasets:", f"- {HUB_DATASETS[card.dataset]}"]
    if card.metrics:
        lines += ["model-index:", f"- name: {name}", "  results:"]
        for metrics in card.metrics:
            setting = f"{metrics.inference}, {metrics.precision}"
            lines += ["  - task:", "      type: image-segmentation", "      name: Semantic Segmentation",
                      "    dataset:", f"      type: {HUB_DATASETS.get(metrics.dataset, metrics.dataset)}",
                      f"      name: {_yaml_string(DATASET_TITLES.get(metrics.dataset, metrics.dataset))}",
                      f"      split: {metrics.split}", "    metrics:",
                      "    - type: mean_iou", f"      value: {round(100 * metrics.mIoU, 2)}",
                      f"      name: {_yaml_string(f'mIoU ({setting})')}",
                      "      args:", f"        inference: {_yaml_string(metrics.inference)}",
                      f"        precision: {_yaml_string(metrics.precision)}",
                      f"        convention: {_yaml_string(metrics.convention)}",
                      "    - type: pixel_accuracy", f"      value: {round(100 * metrics.pixAcc, 2)}",
                      f"      name: {_yaml_string(f'pixAcc ({setting})')}"]
    lines.append("---")
    body = [
        "", f"# {SEGMENTOR_TITLES.get(card.segmentor, card.segmentor)}-{card.backbone} on {title}", "",
        f"A semantic segmentation model written by seg {card.seg_version}: {card.segmentor} on a {card.backbone} "
        f"backbone at output stride {card.output_stride}, {card.num_classes} classes, trained on "
        f"{card.crop_size}x{card.crop_size} crops"
        + (f" of images rescaled around a long side of {card.base_size}, the size it predicts at by default."
           if card.base_size else "."),
        "", "```python", "from seg import Segmenter", "", f"segmenter = Segmenter.from_pretrained({json.dumps(repo_id or 'path/to/this/folder')})",
        'mask = segmenter.predict("image.jpg")   # (H, W) class ids', "```", "",
    ]
    if card.metrics:
        body += ["## Metrics", "", f"mIoU is the {card.metrics[0].convention}; pixAcc counts every labelled pixel.",
                 "", "| dataset | split | inference | precision | mIoU | pixAcc |", "|---|---|---|---|---:|---:|"]
        body += [f"| {DATASET_TITLES.get(m.dataset, m.dataset)} | {m.split} | {m.inference} | {m.precision} | "
                 f"{100 * m.mIoU:.2f} | {100 * m.pixAcc:.2f} |" for m in card.metrics]
        body.append("")
    body += ["## Classes", "", ", ".join(f"{index} {name}" for index, name in enumerate(card.classes)), "",
             f"Label {card.ignore_index} is ignored. Inputs are RGB, scaled to 0..1 and normalised with mean "
             f"{list(card.mean)} and std {list(card.std)}.", ""]
    return "\n".join(lines + body)
