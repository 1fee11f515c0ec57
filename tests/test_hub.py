"""Sharing models: ``Segmenter.save_pretrained`` / ``from_pretrained`` / ``push_to_hub``, ``seg.export --format hf``,
and the migration of checkpoints written before the model card.

Everything runs offline: local folders, huggingface_hub's own cache layout read with ``HF_HUB_OFFLINE=1``, and an
upload recorded by a stand-in for ``HfApi``.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import seg.hub
from seg import Segmenter
from seg.card import CARD_VERSION, CardMetrics, ModelCard, ModelCardError
from seg.data import build_dataset
from seg.engine.checkpoint import checkpoint_card, load_checkpoint, save_checkpoint
from seg.hub import CONFIG_NAME, README_NAME, WEIGHTS_NAME, HubError, read_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def toy_images():
    scenes = build_dataset("toy", "val")
    return [scenes.load(index)["image"][: 90 + 9 * index, : 110 - 7 * index] for index in range(3)]


@pytest.fixture(scope="module")
def trained(discriminating_checkpoint):
    """(Segmenter from the checkpoint, its masks of the toy images): what every shared copy must reproduce."""
    segmenter = Segmenter.from_checkpoint(discriminating_checkpoint, device="cpu", precision="fp32")
    masks = [segmenter.predict(image) for image in toy_images()]
    assert all(len(np.unique(mask)) >= 2 for mask in masks)
    return segmenter, masks


def assert_same_predictions(segmenter: Segmenter, masks) -> None:
    for index, (image, expected) in enumerate(zip(toy_images(), masks)):
        assert np.array_equal(segmenter.predict(image), expected), f"image {index}"


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n"), readme[:80]
    return yaml.safe_load(readme.split("---\n")[1])


def test_save_pretrained_writes_the_card_safetensors_and_a_hub_readme(trained, tmp_path):
    segmenter, masks = trained
    card = segmenter.card.with_metrics(CardMetrics(dataset="toy", split="val", mIoU=0.8512, pixAcc=0.9301,
                                                   iteration=160))
    card = card.with_metrics(CardMetrics(dataset="toy", split="val", mIoU=0.8712, pixAcc=0.9433, inference="ms+flip"))
    shared = Segmenter(_model_of(segmenter), card, device="cpu", precision="fp32")
    folder = shared.save_pretrained(tmp_path / "shared", license="apache-2.0")
    assert sorted(p.name for p in folder.iterdir()) == [README_NAME, CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["card_version"] == CARD_VERSION and config["license"] == "apache-2.0"
    assert ModelCard.from_dict(config) == card.replace(license="apache-2.0")
    # Nothing in the folder is a pickle: the weights open with the official safetensors reader as plain tensors.
    from safetensors.torch import load_file

    loaded = load_file(str(folder / WEIGHTS_NAME))
    reference = {k: v for k, v in segmenter._weights.items()}
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in loaded)
    for path in folder.iterdir():
        head = path.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"PK", f"{path.name} looks like a pickle or a torch zip"

    metadata = front_matter((folder / README_NAME).read_text())
    assert metadata["library_name"] == "seg" and metadata["pipeline_tag"] == "image-segmentation"
    assert metadata["license"] == "apache-2.0"
    results = metadata["model-index"][0]["results"]
    assert [r["dataset"]["split"] for r in results] == ["val", "val"]  # single-scale and ms+flip
    names = [m["name"] for r in results for m in r["metrics"]]
    assert "mIoU (ms+flip, fp32)" in names and "mIoU (single-scale, fp32)" in names
    ms_flip = next(r for r in results if "mIoU (ms+flip, fp32)" in [m["name"] for m in r["metrics"]])
    assert ms_flip["metrics"][0] == {"type": "mean_iou", "value": 87.12, "name": "mIoU (ms+flip, fp32)",
                                     "args": {"inference": "ms+flip", "precision": "fp32",
                                              "convention": "mean over classes with a non-empty union "
                                                            "(mmsegmentation)"}}
    assert "non-empty union" in (folder / README_NAME).read_text()  # the mIoU convention is stated

    assert_same_predictions(Segmenter.from_pretrained(folder, device="cpu", precision="fp32"), masks)


def _model_of(segmenter: Segmenter) -> torch.nn.Module:
    """The trained (unfused) network of ``segmenter``, rebuilt from its card and kept weights."""
    from seg.engine.checkpoint import model_from_card

    return model_from_card(segmenter.card, segmenter._weights)


def test_the_trainer_writes_a_card_that_describes_the_run(discriminating_checkpoint):
    payload = load_checkpoint(discriminating_checkpoint)
    assert "card" in payload and "model_config" not in payload
    card = checkpoint_card(payload, discriminating_checkpoint)
    config = payload["config"]
    assert (card.backbone, card.crop_size, card.base_size, card.dataset) == (
        config["backbone"], config["crop_size"], config["base_size"], config["dataset"])
    scenes = build_dataset("toy", "val")
    assert card.classes == scenes.classes and np.array_equal(np.array(card.palette), scenes.palette)
    from seg import __version__

    assert card.seg_version == __version__


def test_a_pickle_beside_the_shared_files_is_never_opened(trained, tmp_path):
    segmenter, masks = trained
    folder = segmenter.save_pretrained(tmp_path / "shared")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("pytorch_model.bin", "model.pth", "best.pth"):
        (folder / name).write_bytes(pickle.dumps(Payload()))
    assert_same_predictions(Segmenter.from_pretrained(folder, device="cpu", precision="fp32"), masks)
    assert not marker.exists()


@pytest.mark.parametrize("change,expected", [
    (lambda c: c.update(backbone="resnest1000"), "config.json: backbone 'resnest1000' is unknown"),
    (lambda c: c.update(num_classes=c["num_classes"] + 1), "classes lists 4 names but num_classes is 5"),
    (lambda c: c.pop("classes"), "config.json: missing key(s) classes"),
    (lambda c: c.update(card_version=CARD_VERSION + 1), "is newer than this seg"),
    (lambda c: c.update(crop_size="big"), "crop_size must be an integer, got 'big'"),
    (lambda c: c.update(colour="red"), "unknown key(s) colour"),
])
def test_a_malformed_config_gives_one_clear_error(trained, tmp_path, change, expected):
    segmenter, _ = trained
    folder = segmenter.save_pretrained(tmp_path / "shared")
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ModelCardError, match=None) as raised:
        Segmenter.from_pretrained(folder, device="cpu")
    message = str(raised.value)
    assert expected in message and str(folder / CONFIG_NAME) in message and "\n" not in message


def test_weights_of_another_class_count_than_the_card_are_refused(trained, tmp_path):
    segmenter, _ = trained
    folder = segmenter.save_pretrained(tmp_path / "shared")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(num_classes=3, classes=config["classes"][:3], palette=config["palette"][:3])
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ModelCardError, match="the weights do not fit the card's deeplabv3-resnest14 with 3 classes"):
        Segmenter.from_pretrained(folder, device="cpu")
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ModelCardError, match="config.json: not valid JSON"):
        Segmenter.from_pretrained(folder, device="cpu")
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(HubError, match="config.json is missing"):
        read_model(folder)


def test_predict_cli_reports_a_malformed_folder_in_one_line(trained, tmp_path):
    segmenter, _ = trained
    folder = segmenter.save_pretrained(tmp_path / "shared")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["backbone"] = "nope"
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(toy_images()[0]).save(image)
    result = subprocess.run([sys.executable, "-m", "seg.predict", str(image), "--checkpoint", str(folder), "--out",
                             str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --checkpoint: {folder / CONFIG_NAME}: backbone 'nope' is unknown; choose one of: "
        + result.stderr.split("choose one of: ", 1)[1].strip()]


def hub_cache(root: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"
              ) -> Path:
    """Lay ``folder``'s files out as huggingface_hub caches a download of ``repo_id`` at ``main``: blobs, a snapshot
    of links to them, and refs/main naming the commit."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import hashlib

    for path in folder.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    return root


def test_a_hub_repo_id_loads_from_huggingface_hubs_cache_offline(trained, tmp_path):
    """In a fresh process with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at the cache layout: the repo id, its
    branch and its commit load the same model; a repo that is not cached is one clear error."""
    segmenter, masks = trained
    cache = hub_cache(tmp_path / "cache", "someone/deeplab-toy", segmenter.save_pretrained(tmp_path / "shared"))
    images = tmp_path / "images.npy"
    np.save(images, np.stack([image[:90, :90] for image in toy_images()]))
    expected = [segmenter.predict(image[:90, :90]) for image in toy_images()]
    script = f"""
import json, sys
import numpy as np
from seg import Segmenter
from seg.hub import HubError
images = np.load({str(images)!r})
out = {{}}
for revision in (None, "main", "0123456789abcdef0123456789abcdef01234567"):
    segmenter = Segmenter.from_pretrained("someone/deeplab-toy", revision=revision, device="cpu", precision="fp32")
    out[str(revision)] = [segmenter.predict(image).tolist() for image in images]
try:
    Segmenter.from_pretrained("someone/not-cached", device="cpu")
except HubError as error:
    out["missing"] = str(error)
print(json.dumps(out))
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for revision in ("None", "main", "0123456789abcdef0123456789abcdef01234567"):
        assert all(np.array_equal(np.array(got), want) for got, want in zip(out[revision], expected)), revision
    assert "someone/not-cached is not in the Hugging Face cache" in out["missing"]
    assert "HF_HUB_OFFLINE=1" in out["missing"] and "\n" not in out["missing"]


def test_push_to_hub_uploads_the_shared_folder(trained, monkeypatch):
    segmenter, _ = trained
    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message="", allow_patterns=None):
            files = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}
            calls.append(("upload_folder", repo_id, sorted(files), commit_message))
            readme = files[README_NAME].decode()
            assert 'Segmenter.from_pretrained("someone/deeplab-toy")' in readme
            assert ModelCard.from_dict(json.loads(files[CONFIG_NAME])) == segmenter.card

            class Commit:
                commit_url = f"https://huggingface.co/{repo_id}/commit/abc"
            return Commit()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    url = segmenter.push_to_hub("someone/deeplab-toy", private=True, token="t0ken", commit_message="first")
    assert url == "https://huggingface.co/someone/deeplab-toy/commit/abc"
    assert calls == [("init", "t0ken"), ("create_repo", "someone/deeplab-toy", True, True),
                     ("upload_folder", "someone/deeplab-toy", [README_NAME, CONFIG_NAME, WEIGHTS_NAME], "first")]


def test_export_hf_writes_a_folder_with_the_evaluated_metrics(discriminating_checkpoint, trained, tmp_path):
    from seg import export

    segmenter, masks = trained
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"dataset": "toy", "split": "val", "mIoU": 0.9, "pixAcc": 0.95,
                                      "inference": {"setting": "ms+flip", "precision": "fp32"}}))
    out = tmp_path / "hf"
    code = export.main(["--checkpoint", str(discriminating_checkpoint), "--format", "hf", "--out", str(out),
                        "--metrics", str(evaluation), "--license", "mit"])
    assert code == 0
    card = ModelCard.from_dict(json.loads((out / CONFIG_NAME).read_text()))
    assert card.license == "mit" and card.metrics[-1].inference == "ms+flip" and card.metrics[-1].mIoU == 0.9
    assert_same_predictions(Segmenter.from_pretrained(out, device="cpu", precision="fp32"), masks)
    evaluation.write_text(json.dumps({"dataset": "ade20k", "split": "val", "mIoU": 0.4, "pixAcc": 0.8,
                                      "inference": {"setting": "ms+flip", "precision": "fp32"}}))
    assert export.main(["--checkpoint", str(discriminating_checkpoint), "--format", "hf", "--out",
                        str(tmp_path / "hf2"), "--metrics", str(evaluation)]) == 2
    assert not (tmp_path / "hf2" / CONFIG_NAME).exists()


def pre_card_checkpoint(payload: dict, path: Path) -> Path:
    """``payload`` re-written with the keys seg wrote before the model card (seg 0.1.0 up to issue 16)."""
    card = checkpoint_card(payload)
    old = {key: value for key, value in payload.items() if key not in ("card", "format")}
    old.update(model_config={"segmentor": card.segmentor, "backbone": card.backbone,
                             "num_classes": card.num_classes, "output_stride": card.output_stride,
                             "aux": card.aux},
               classes=list(card.classes), palette=[list(c) for c in card.palette],
               normalisation={"mean": list(card.mean), "std": list(card.std)}, dataset=card.dataset)
    return save_checkpoint(old, path)


def test_checkpoints_written_before_the_card_still_load_everywhere(discriminating_checkpoint, trained, tmp_path):
    segmenter, masks = trained
    old = pre_card_checkpoint(load_checkpoint(discriminating_checkpoint), tmp_path / "old.pth")
    assert "card" not in load_checkpoint(old)
    migrated = checkpoint_card(load_checkpoint(old), old)
    expected = segmenter.card
    assert migrated.replace(seg_version=expected.seg_version, metrics=expected.metrics) == expected
    assert_same_predictions(Segmenter.from_checkpoint(old, device="cpu", precision="fp32"), masks)

    from seg import eval as seg_eval, export

    for source, name in ((discriminating_checkpoint, "new"), (old, "old")):
        assert seg_eval.main(["--checkpoint", str(source), "--limit", "2", "--workers", "0", "--device", "cpu",
                              "--json", str(tmp_path / f"{name}.json")]) == 0
    new_metrics, old_metrics = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("new", "old"))
    assert old_metrics["mIoU"] == new_metrics["mIoU"] and old_metrics["inference"] == new_metrics["inference"]
    assert export.main(["--checkpoint", str(old), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert_same_predictions(Segmenter.from_pretrained(tmp_path / "hf", device="cpu", precision="fp32"), masks)
    broken = {k: v for k, v in load_checkpoint(old).items() if k not in ("palette", "format")}
    with pytest.raises(ModelCardError, match="neither a model card nor the older .* keys"):
        checkpoint_card(broken, "x.pth")
