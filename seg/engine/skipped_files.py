"""``SkippedFiles``: under ``skip_bad_samples``, each unreadable training file that was replaced is reported once.

It exists because such a file may be met by a DataLoader worker of any rank, in every epoch, and again after a
resume, while a person wants one warning per file: the messages each rank met are gathered across the ranks at
the trainer's reporting points, new ones are written to stderr and ``log.jsonl`` by rank 0 with the running
count, and the list of reported files travels in the checkpoint so a resumed run does not report them again.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Iterable, List

import torch.distributed as dist
from tqdm import tqdm


class SkippedFiles:
    """The replaced files of a run: ``reported`` (all ranks', in the checkpoint) and this rank's unreported ones.

    ``log`` receives one record per newly reported file (the run log; it writes on rank 0 only).
    """

    def __init__(self, enabled: bool, world_size: int, is_main: bool, log: Callable[[Dict[str, Any]], None]) -> None:
        self.enabled = enabled
        self.world_size = world_size
        self.is_main = is_main
        self.log = log
        self.reported: List[str] = []
        self._unreported: List[str] = []

    def __len__(self) -> int:
        return len(self.reported)

    def met(self, messages: Iterable[str]) -> None:
        """Note the messages of the files a batch of this rank's stood in for (a batch's ``"skipped"``)."""
        self._unreported += messages

    def report(self, iteration: int) -> None:
        """Report each file not reported before, whichever rank met it. Every rank calls this at the same
        iterations (it gathers across them); does nothing unless ``enabled``."""
        if not self.enabled:
            return
        met = [self._unreported]
        if self.world_size > 1:
            met = [None] * self.world_size
            dist.all_gather_object(met, self._unreported)
        self._unreported = []
        for message in (m for rank_messages in met for m in rank_messages):
            if message in self.reported:
                continue
            self.reported.append(message)
            if self.is_main:
                tqdm.write(f"warning: skipped an unreadable training sample: {message}", file=sys.stderr)
            self.log({"iteration": iteration, "skipped_file": message, "skipped_files": len(self.reported)})
