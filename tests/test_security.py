"""Untrusted files never run code, and the source tree holds no way for them to.

1. A checkpoint whose pickle would run code (it creates a marker file when unpickled) is refused by every entry
   point that reads checkpoints or weights: the Python APIs raise their own error, the CLIs exit non-zero with one
   line on stderr and no traceback, and the marker never appears. A positive control proves each hostile file
   really does run its code when unpickled the unsafe way, so the refusals are not vacuous.
2. A static, AST-based scan of seg/, datasets/ and bench/ finds no unsafe loading (``torch.load`` without
   ``weights_only=True``, ``pickle``/``marshal``/``shelve``/``yaml.load``, ``numpy.load(allow_pickle=True)``), no
   shell (``shell=True``, ``os.system``, ``os.popen``, command strings given to ``subprocess``), no
   ``eval``/``exec``, and no ``extractall`` (archives go through ``seg.data.download.safe_extract``). The checker
   is itself tested on small bad and good snippets, so it can fail.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from seg.engine.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from seg.models import PretrainedWeightsError, build_segmentor, load_pretrained
from seg.predictor import Segmenter

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- hostile files


class _CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: the file appearing is proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _seg_checkpoint_around(payload: object) -> Dict[str, object]:
    """A dict shaped like a real ``seg`` checkpoint (marker, weights, model config), with the hostile object in
    one entry. The loaders must refuse it while unpickling, before they ever look at the weights, so a few
    tensors stand in for a full model's."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {"backbone.conv1.0.weight": torch.zeros(2, 3, 3, 3), "head.block.4.bias": torch.zeros(4)},
        "model_config": {"segmentor": "deeplabv3", "backbone": "resnest14", "num_classes": 4, "aux": False},
        "classes": ["a", "b", "c", "d"],
        "palette": [[0, 0, 0]] * 4,
        "config": {"dataset": "toy"},
        "extra": payload,
    }


def _write_raw_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as handle:
        pickle.dump(_CreatesMarker(marker), handle, protocol=2)  # the protocol torch.load expects, so no warning


def _write_zip_pth(path: Path, marker: Path) -> None:
    torch.save(_CreatesMarker(marker), path)  # torch's default zip container


def _write_seg_checkpoint_zip(path: Path, marker: Path) -> None:
    torch.save(_seg_checkpoint_around(_CreatesMarker(marker)), path)


def _write_seg_checkpoint_legacy(path: Path, marker: Path) -> None:
    torch.save(_seg_checkpoint_around(_CreatesMarker(marker)), path, _use_new_zipfile_serialization=False)


def _write_state_dict_wrapper(path: Path, marker: Path) -> None:
    # What load_pretrained looks inside: {"state_dict": {...}}, with the payload beside real tensors.
    torch.save({"state_dict": {"conv.weight": torch.zeros(1), "hook": _CreatesMarker(marker)}}, path)


HOSTILE_WRITERS: Dict[str, Callable[[Path, Path], None]] = {
    "raw-pickle": _write_raw_pickle,
    "zip-pth": _write_zip_pth,
    "seg-checkpoint-zip": _write_seg_checkpoint_zip,
    "seg-checkpoint-legacy": _write_seg_checkpoint_legacy,
    "state-dict-wrapper": _write_state_dict_wrapper,
}


class Hostile:
    """A hostile file and the marker its pickle would create."""

    def __init__(self, folder: Path, kind: str) -> None:
        self.marker = folder / f"pwned-{kind}"
        self.path = folder / f"{kind}.pth"
        HOSTILE_WRITERS[kind](self.path, self.marker)
        assert not self.marker.exists()

    def assert_nothing_ran(self) -> None:
        assert not self.marker.exists(), f"loading {self.path.name} ran the pickled code"


@pytest.fixture(params=sorted(HOSTILE_WRITERS))
def hostile(request, tmp_path) -> Hostile:
    return Hostile(tmp_path, request.param)


def test_the_hostile_files_really_run_code_when_unpickled_unsafely(hostile):
    # The control: without weights_only=True the marker appears, so its absence below means something.
    try:
        torch.load(hostile.path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - a raw pickle is no torch file: torch.load fails, but only after running it
        pass
    assert hostile.marker.exists()


# ------------------------------------------------------------------------------------------- Python APIs


def test_load_checkpoint_refuses_pickled_code(hostile):
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(hostile.path)
    hostile.assert_nothing_ran()


def test_segmenter_from_checkpoint_refuses_pickled_code(hostile):
    with pytest.raises(CheckpointError, match=hostile.path.name):
        Segmenter.from_checkpoint(hostile.path, device="cpu")
    hostile.assert_nothing_ran()


def test_load_pretrained_refuses_pickled_code(hostile):
    model = build_segmentor("deeplabv3", backbone="resnest14", num_classes=4, aux=False)
    with pytest.raises(PretrainedWeightsError, match="weights_only=True"):
        load_pretrained(model, hostile.path)
    hostile.assert_nothing_ran()


# ------------------------------------------------------------------------------------------- CLIs in process


def _toy_image(folder: Path) -> Path:
    path = folder / "image.png"
    Image.fromarray(np.full((40, 56, 3), 127, np.uint8)).save(path)
    return path


def _cli_arguments(entry: str, hostile_file: Path, folder: Path) -> List[str]:
    """argv that makes ``entry`` read ``hostile_file`` (each CLI's own way of being given a checkpoint)."""
    out = str(folder / "out")
    tiny = ["--dataset", "toy", "--iters", "1", "--batch-size", "2", "--crop-size", "32", "--base-size", "48",
            "--workers", "0", "--output-dir", out, "--device", "cpu"]
    return {
        "train --resume": [*tiny, "--resume", str(hostile_file)],
        "train --pretrained": [*tiny, "--pretrained", str(hostile_file)],
        "eval --checkpoint": ["--checkpoint", str(hostile_file), "--device", "cpu"],
        # With --backbone and --dataset, eval treats a non-seg file as a state dict (the PyTorch-Encoding path).
        "eval --checkpoint --backbone": ["--checkpoint", str(hostile_file), "--backbone", "resnest14",
                                         "--dataset", "toy", "--device", "cpu", "--limit", "1"],
        "predict --checkpoint": [str(_toy_image(folder)), "--checkpoint", str(hostile_file), "--out", out,
                                 "--device", "cpu"],
        "export --checkpoint": ["--checkpoint", str(hostile_file), "--format", "torchscript",
                                "--out", str(folder / "model.pt")],
    }[entry]


def _cli_main(entry: str) -> Callable[[List[str]], int]:
    module = entry.split()[0]
    if module == "train":
        from seg.train import main
    elif module == "eval":
        from seg.eval import main
    elif module == "predict":
        from seg.predict import main
    else:
        from seg.export import main
    return main


CLI_ENTRIES = ["train --resume", "train --pretrained", "eval --checkpoint", "eval --checkpoint --backbone",
               "predict --checkpoint", "export --checkpoint"]


def _assert_one_line_error(status: Optional[int], stderr: str) -> None:
    assert status not in (0, None), f"exit status {status}; stderr: {stderr[-500:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr[-1000:]}"
    assert lines[0].startswith("error:"), lines[0]


# The seg checkpoint in the zip container is what a real attack would look like, the raw pickle the simplest;
# the other containers are covered through the Python APIs above, which the CLIs call.
@pytest.mark.parametrize("kind", ["raw-pickle", "seg-checkpoint-zip"])
@pytest.mark.parametrize("entry", CLI_ENTRIES)
def test_cli_refuses_pickled_code_with_one_line(entry, kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository's outputs/
    file = Hostile(tmp_path, kind)
    argv = _cli_arguments(entry, file.path, tmp_path)
    try:
        status = _cli_main(entry)(argv)
    except SystemExit as exit_:  # argparse's p.error, or a sys.exit inside the CLI
        status = exit_.code
    except Exception as error:  # noqa: BLE001 - an escaping exception is the failure this test reports
        pytest.fail(f"python -m seg.{entry} raised {type(error).__name__}: {error} instead of exiting with a "
                    f"one-line error")
    stderr = capsys.readouterr().err
    _assert_one_line_error(status, stderr)
    assert file.path.name in stderr  # the message names the file it refused
    file.assert_nothing_ran()


# ------------------------------------------------------------------------------------------- CLIs as processes


def test_every_cli_process_exits_with_one_line_and_no_traceback(tmp_path):
    # One real process per CLI: what a user sees, including anything printed while the interpreter exits. They
    # run side by side because each spends most of its time importing torch.
    processes = {}
    for entry in ("train --resume", "eval --checkpoint", "predict --checkpoint", "export --checkpoint"):
        folder = tmp_path / entry.split()[0]
        folder.mkdir()
        file = Hostile(folder, "seg-checkpoint-zip")
        argv = _cli_arguments(entry, file.path, folder)
        command = [sys.executable, "-m", f"seg.{entry.split()[0]}", *argv]
        processes[entry] = (file, subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True))
    for entry, (file, process) in processes.items():
        _, stderr = process.communicate(timeout=180)
        try:
            _assert_one_line_error(process.returncode, stderr)
        except AssertionError as failure:
            raise AssertionError(f"python -m seg.{entry}: {failure}") from None
        assert file.path.name in stderr, f"python -m seg.{entry}: {stderr}"
        file.assert_nothing_ran()


# ------------------------------------------------------------------------------------------- static scan


SCANNED_FOLDERS = ("seg", "datasets", "bench")

# Fully qualified callables that read pickles (or other code-carrying formats) and are never safe on a file.
UNSAFE_LOADERS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
    "cPickle.loads", "dill.load", "dill.loads", "marshal.load", "marshal.loads", "shelve.open",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.serialization.load_legacy",
}
SHELL_CALLS = {"os.system", "os.popen", "os.execl", "os.execle", "os.execlp", "os.execlpe", "os.execv",
               "os.execve", "os.execvp", "os.execvpe", "os.spawnl", "os.spawnlp", "os.spawnv", "os.spawnvp",
               "commands.getoutput", "subprocess.getoutput", "subprocess.getstatusoutput"}
SUBPROCESS_CALLS = {"subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
                    "subprocess.Popen", "asyncio.create_subprocess_exec"}
TORCH_LOADERS = {"torch.load", "torch.serialization.load"}


def _imported_names(tree: ast.AST) -> Dict[str, str]:
    """Local name -> fully qualified name, from the module's imports (``import torch as T``, ``from x import y``)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # "import os.path" binds "os"; "import torch.serialization as ts" binds ts to the full name.
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    names[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(node: ast.AST, imports: Dict[str, str]) -> Optional[str]:
    """``torch.load`` for ``T.load`` after ``import torch as T``; None for calls on computed objects."""
    if isinstance(node, ast.Name):
        return imports.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _qualified(node.value, imports)
        return f"{base}.{node.attr}" if base else None
    return None


def _keyword(call: ast.Call, name: str) -> Optional[ast.expr]:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: Optional[ast.expr], value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _is_string_built(node: ast.expr) -> bool:
    """A command given as one string: a literal, an f-string, ``"..." % x``, ``"..." + x`` or ``"...".format()``."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return _is_string_built(node.left) or _is_string_built(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _is_string_built(node.func.value)
    return False


def unsafe_calls(source: str, filename: str = "<snippet>") -> List[str]:
    """Every unsafe construct in ``source`` as ``file:line: what`` (an empty list for safe code)."""
    tree = ast.parse(source, filename)
    imports = _imported_names(tree)
    findings = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, imports)
        where = f"{filename}:{node.lineno}"
        if name in TORCH_LOADERS and not _is_constant(_keyword(node, "weights_only"), True):
            findings.append(f"{where}: {name} without weights_only=True")
        elif name in UNSAFE_LOADERS:
            findings.append(f"{where}: {name} can run code from the file it reads")
        elif name in ("numpy.load", "np.load") and not _is_constant(_keyword(node, "allow_pickle"), False) \
                and _keyword(node, "allow_pickle") is not None:
            findings.append(f"{where}: {name} with allow_pickle")
        elif name in SHELL_CALLS:
            findings.append(f"{where}: {name} runs a shell or replaces the process")
        elif name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile", "__import__"):
            findings.append(f"{where}: {name}() on computed text")
        elif isinstance(node.func, ast.Attribute) and node.func.attr == "extractall":
            findings.append(f"{where}: extractall (use seg.data.download.safe_extract)")
        if name in SUBPROCESS_CALLS or name in SHELL_CALLS:
            shell = _keyword(node, "shell")
            if shell is not None and not _is_constant(shell, False):
                findings.append(f"{where}: {name} with shell=")
            command = node.args[0] if node.args else _keyword(node, "args")
            if command is not None and _is_string_built(command):
                findings.append(f"{where}: {name} given a command string (pass a list of arguments)")
    return findings


def _python_files() -> Iterator[Path]:
    for folder in SCANNED_FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_source_tree_has_no_unsafe_loading_shell_or_eval():
    files = list(_python_files())
    assert any(path.name == "weights.py" for path in files) and len(files) > 30  # the scan really saw the tree
    findings = [finding for path in files
                for finding in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert findings == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x.pth')",
        "import torch\ntorch.load('x.pth', weights_only=False)",
        "import torch as T\nT.load(path, map_location='cpu')",
        "from torch import load\nload(path)",
        "import torch\nflag = True\ntorch.load(path, weights_only=flag)",
        "import pickle\npickle.load(open(path, 'rb'))",
        "import pickle as p\np.loads(data)",
        "from pickle import Unpickler\nUnpickler(handle).load()",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "import yaml\nyaml.load(text)",
        "import os\nos.system('ls ' + folder)",
        "import os\nos.popen(command)",
        "import subprocess\nsubprocess.run(['ls'], shell=True)",
        "import subprocess\nsubprocess.run(command, shell=use_shell)",
        "import subprocess\nsubprocess.check_output(f'git log {ref}')",
        "from subprocess import Popen\nPopen('rm -rf ' + path)",
        "import subprocess\nsubprocess.call('tar xf {}'.format(archive))",
        "eval(text)",
        "exec(compile(source, 'x', 'exec'))",
        "import tarfile\ntarfile.open(path).extractall(destination)",
    ],
)
def test_the_checker_finds_unsafe_snippets(snippet):
    assert unsafe_calls(snippet), f"not flagged: {snippet!r}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
        "model.eval()",
        "import subprocess, sys\nsubprocess.run([sys.executable, '-m', 'seg.train'], check=True)",
        "import subprocess\nsubprocess.run(['git', 'rev-parse', 'HEAD'], shell=False)",
        "import numpy as np\nnp.load(path)",
        "import json\njson.load(handle)",
        "import zipfile\nzipfile.ZipFile(path).open(member)",
    ],
)
def test_the_checker_passes_safe_snippets(snippet):
    assert unsafe_calls(snippet) == []
