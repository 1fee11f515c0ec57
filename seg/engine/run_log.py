"""``RunLog``: a run's record, one JSON object per line in ``log.jsonl``, with its numbers mirrored as
TensorBoard scalars when ``tensorboard`` is installed.

It exists so that the loop logs with one call and knows nothing of the sinks: every rank calls :meth:`RunLog.write`
at the same places, only rank 0's log writes (one file, one event stream), the optional TensorBoard writer is
created on the first record, and a log that cannot be appended to stops the run with a :class:`TrainingError`
naming the file rather than losing the record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Union

from .checkpoint import describe
from .errors import TrainingError


def tensorboard_writer(output_dir: Path):
    """A SummaryWriter into ``output_dir/tensorboard`` when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


class RunLog:
    """``output_dir/log.jsonl`` (and ``output_dir/tensorboard``), written only when ``enabled`` (rank 0)."""

    def __init__(self, output_dir: Union[str, Path], enabled: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "log.jsonl"
        self.enabled = enabled
        self._tensorboard: Any = None  # None: not created yet; False: tensorboard is not installed

    def write(self, record: Dict[str, Any]) -> None:
        """Append ``record`` (JSON-serialisable, with an ``iteration``) as one line, and its numbers other than
        the iteration as TensorBoard scalars at that step; TrainingError if the file cannot be appended to."""
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise TrainingError(f"cannot append to {self.path}: {describe(error)}") from None
        if self._tensorboard is None:
            self._tensorboard = tensorboard_writer(self.output_dir) or False
        if self._tensorboard:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record["iteration"])
            self._tensorboard.flush()

    def close(self) -> None:
        """Close the TensorBoard writer, if one was created (a later record opens a new one)."""
        if self._tensorboard:
            self._tensorboard.close()
        self._tensorboard = None
