"""``StopSignals``: SIGTERM or SIGINT ends training cleanly, at an iteration every rank agrees on.

It exists because a scheduler's SIGTERM may reach the ranks one at a time, or only one of them, and a rank that
saved and returned alone would leave the others waiting forever in their next collective. The handler only records
the signal; once per iteration the loop asks :meth:`StopSignals.agreed`, the signal as every rank sees it
(:class:`~seg.engine.distributed.StopVote`), then saves ``last.pth``, waits for every rank
(:meth:`StopSignals.wait_for_all`) and returns. As a context manager it installs its handlers for the loop only and
puts the previous ones back afterwards.
"""

from __future__ import annotations

import signal
from typing import Any, Dict, Optional

from .distributed import StopVote


class StopSignals:
    """The stop requests of a run of ``world_size`` processes (constructing it is a collective under DDP)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, world_size: int) -> None:
        self.received: Optional[int] = None  # set by this process's handler
        self._vote = StopVote(world_size)
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _record(self, signum: int, _frame) -> None:
        self.received = signum

    def agreed(self) -> Optional[int]:
        """The signal any rank received (the highest, if several), or None; the same on every rank. A signal that
        arrives after this vote is acted on at the next one."""
        return self._vote.agree(self.received)

    def wait_for_all(self) -> None:
        """Return once every rank got here (no rank exits while rank 0 still writes the checkpoint)."""
        self._vote.wait_for_all()
