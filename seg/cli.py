"""What the command lines share: :class:`ArgumentParser` (every CLI and preparation script), the argument
checks of the inference CLIs (``seg.eval``, ``seg.predict``, ``seg.export``) and :func:`flag_message`, which words
the library's :class:`~seg.config.ConfigError` (naming a setting) with the flag that sets it.

Each mistake is caught before any model is built and reported as one line naming the flag, the value and what
was expected (exit status 2, through :class:`ArgumentParser`).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:  # seg.config is only needed for the annotation
    from seg.config import ConfigError

__all__ = ["ArgumentParser", "MAX_CROP_SIZE", "checkpoint_problem", "crop_size_type", "flag_message", "int_in_range",
           "output_problem", "parse_scales"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2), like every other user mistake."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_message(error: ConfigError, renames: Optional[Mapping[str, str]] = None) -> str:
    """``error`` worded for a command line: its setting replaced by the flag, ``"--crop-size must be positive, got
    0"`` for ``crop_size``.

    A setting ``foo_bar`` becomes ``--foo-bar`` unless ``renames`` maps it to another flag (e.g.
    ``{"window_batch": "--batch-size"}``). An error without a setting (a file or key problem) comes back unchanged.
    """
    setting = getattr(error, "setting", None)
    if setting is None:
        return str(error)
    flag = (renames or {}).get(setting, "--" + setting.replace("_", "-"))
    return f"{flag} {error.problem}"


# The largest window side accepted: 4096 x 4096 windows already take gigabytes of activations per image at output
# stride 8; training crops are 480-1024.
MAX_CROP_SIZE = 4096


def parse_scales(text: str) -> tuple:
    """argparse type: ``"0.5,0.75,1.0"`` -> ``(0.5, 0.75, 1.0)``; every scale a finite positive number."""
    try:
        scales = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}") from None
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return scales


def int_in_range(low: int, high: Optional[int] = None):
    """argparse type: an integer in ``low..high`` (no upper bound when ``high`` is None)."""
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


crop_size_type = int_in_range(1, MAX_CROP_SIZE)


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be a checkpoint file or shared model folder, for what torch.load's own errors say
    badly; else None (a missing file or Hub repo id is left to :func:`seg.hub.read_model`)."""
    if path.is_dir() and not (path / "config.json").is_file():
        return (f"{path} is a folder without config.json; expected a checkpoint file such as "
                f"outputs/<run>/best.pth or a folder written by seg.export --format hf")
    if path.is_file() and path.stat().st_size == 0:
        return f"{path} is empty (0 bytes); expected a checkpoint written by python -m seg.train"
    return None


def output_problem(path: Path, folder: bool) -> Optional[str]:
    """Why ``path`` cannot be written as an output folder (``folder``) or file, else None; creates nothing.

    Judged from the path itself and its nearest existing ancestor: an existing file where a folder is needed
    (or the reverse), a file in the middle of the path, or an ancestor without write permission.
    """
    if folder and path.exists() and not path.is_dir():
        return f"{path} is a file; expected a folder (existing or new)"
    if not folder and path.is_dir():
        return f"{path} is a folder; expected a file name"
    ancestor = path if folder and path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{path} cannot be created: {ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {ancestor} is not writable"
    return None
