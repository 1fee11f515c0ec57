"""``LossGuard``: a run whose loss stops being finite ends before anything trained on it is logged or saved.

It exists because checking every step's loss on the host would synchronise the device at every iteration. The
guard instead remembers on the device the first iteration whose loss was not finite (:meth:`LossGuard.note`, no
sync), and the trainer asks it (:meth:`LossGuard.check`) before every log, validation and save, where the loop
synchronises anyway. Under DDP the ranks agree on the earliest bad iteration of any of them with one all-reduce, so
every rank stops at the same point and no checkpoint ever holds the weights that followed a non-finite loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist

from .errors import TrainingError

# Stands for "no bad iteration" in the all-reduce (the ranks take the max of minus their first bad iteration).
_NONE = -(2**62)


class LossGuard:
    """The first non-finite loss of a run of ``world_size`` processes writing to ``output_dir``."""

    def __init__(self, world_size: int, output_dir: Union[str, Path]) -> None:
        self.world_size = world_size
        self.output_dir = Path(output_dir)
        self._first_bad: Optional[torch.Tensor] = None  # first iteration with a non-finite loss (0: none yet)
        self._bad_loss: Optional[torch.Tensor] = None

    def note(self, loss: torch.Tensor, iteration: int) -> None:
        """Remember ``iteration`` if ``loss`` (0-d) is not finite and no earlier one was seen; on the device."""
        if self._first_bad is None:
            self._first_bad = torch.zeros((), dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), device=loss.device)
        first = (~torch.isfinite(loss)) & (self._first_bad == 0)
        self._first_bad = torch.where(first, iteration, self._first_bad)
        self._bad_loss = torch.where(first, loss.detach().float(), self._bad_loss)

    def check(self) -> None:
        """Raise TrainingError if any rank noted a non-finite loss since the start (a collective under DDP: every
        rank calls it at the same iterations, after noting the same ones)."""
        if self._first_bad is None:
            return
        first_bad = self._first_bad.clone()
        if self.world_size > 1:
            # The earliest bad iteration of any rank (0 means none): max over ranks of -iteration, 0 left as 0.
            encoded = torch.where(first_bad > 0, -first_bad, torch.full_like(first_bad, _NONE))
            dist.all_reduce(encoded, op=dist.ReduceOp.MAX)
            first_bad = torch.where(encoded > _NONE, -encoded, torch.zeros_like(encoded))
        iteration = int(first_bad.item())
        if iteration:
            value = self._bad_loss.item() if self._first_bad.item() == iteration else float("nan")
            raise TrainingError(
                f"the loss became {value} at iteration {iteration}; stopped without saving "
                f"(the last good checkpoint in {self.output_dir} is intact); try a lower lr or amp off"
            )
