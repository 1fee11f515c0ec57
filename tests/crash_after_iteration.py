"""``python tests/crash_after_iteration.py <seg.train arguments>``: ``seg.train`` whose worker SIGKILLs itself after
an optimizer step, for the tests of recovery (exact resume, ``torchrun --max-restarts``).

The iteration comes from ``SEG_TEST_CRASH_AT_ITERATION``; unset or empty, the script is plain ``seg.train``. The
process dies only in the last rank, and only in the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so
the worker ``torchrun`` restarts runs to the end. It dies through ``Trainer.after_step_hooks``: after step N is
taken and counted, before that iteration's stop vote, log, validation and checkpoint, so ``last.pth`` is the one
before it. Runs the same under ``torchrun ... tests/crash_after_iteration.py ...``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

CRASH_VARIABLE = "SEG_TEST_CRASH_AT_ITERATION"


def crash_iteration() -> Optional[int]:
    """The iteration from the environment, None when unset; SystemExit when it is not a number."""
    value = os.environ.get(CRASH_VARIABLE)
    if not value:
        return None
    if not value.isdigit():
        sys.exit(f"error: {CRASH_VARIABLE} must be an iteration number, got {value!r}")
    return int(value)


def crash_after(iteration: int):
    """The after-step hook that SIGKILLs the process after ``iteration`` in the last rank's first attempt."""
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0

    def hook(trainer) -> None:
        last_rank = trainer.context.rank == trainer.context.world_size - 1
        if first_attempt and last_rank and trainer.iteration == iteration:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main() -> int:
    iteration = crash_iteration()
    from seg.engine.trainer import Trainer
    from seg.train import main as train

    if iteration is not None:
        Trainer.after_step_hooks.append(crash_after(iteration))
    return train()


if __name__ == "__main__":
    sys.exit(main())
