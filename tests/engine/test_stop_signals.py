"""StopSignals in one process: inside its ``with`` block SIGTERM and SIGINT are recorded, not fatal, and
:meth:`agreed` returns them; afterwards the previous handlers are back. (Across ranks:
test_collaborators_across_ranks.py; a real run stopped by SIGTERM: test_training.py and test_torchrun.py.)"""

from __future__ import annotations

import os
import signal

import pytest

from seg.engine.stop_signals import StopSignals


@pytest.fixture
def handlers_kept():
    saved = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_recorded_and_agreed_then_the_previous_handler_is_back(signum, handlers_kept):
    seen = []
    signal.signal(signum, lambda s, frame: seen.append(s))
    stops = StopSignals(world_size=1)
    with stops:
        assert stops.agreed() is None
        os.kill(os.getpid(), signum)  # handled before os.kill returns to Python code
        assert stops.agreed() == signum
        stops.wait_for_all()  # alone: returns at once
    assert seen == []  # the run's handler took it
    os.kill(os.getpid(), signum)
    assert seen == [signum]  # and the previous handler is back


def test_handlers_are_put_back_when_the_loop_raises(handlers_kept):
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with pytest.raises(RuntimeError):
        with StopSignals(world_size=1):
            assert all(signal.getsignal(s) != before[s] for s in StopSignals.SIGNALS)
            raise RuntimeError("the loop failed")
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before
