"""Bounded work: how many requests the service holds at once, and what runs them.

:class:`Admission` admits at most ``ServeSettings.admitted`` requests (running or waiting); one more is
:class:`Overloaded` (the app answers 503 with Retry-After) at once, so a flood of clients meets a quick refusal
rather than a queue that grows until they time out. Predictions run on ``concurrency`` threads of their own, off
the event loop, so health checks and metrics answer while the model computes.

:class:`MicroBatcher` (``max_batch`` > 1) gathers requests that arrive within ``batch_wait_ms`` of the first and
predicts them in one forward pass (:meth:`seg.predictor.Segmenter.predict_batch`).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

__all__ = ["Admission", "MicroBatcher", "Overloaded"]


class Overloaded(Exception):
    """The service holds as many requests as it may; the client should retry later."""


class Admission:
    """Counts the requests inside the service and runs their predictions on its own threads."""

    def __init__(self, limit: int, threads: int) -> None:
        self.limit = limit
        self.inside = 0
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="seg-predict")

    def enter(self) -> None:
        """Admit one request, or raise :class:`Overloaded`; every admitted request must :meth:`leave`."""
        if self.inside >= self.limit:
            raise Overloaded(f"the service is at its limit of {self.limit} requests; retry later")
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1

    async def run(self, function: Callable[..., Any], *args: Any) -> Tuple[Any, float, float]:
        """(``function(*args)``, when a prediction thread started it, when it returned), on a prediction thread;
        times are ``time.perf_counter()`` seconds."""
        def timed() -> Tuple[Any, float, float]:
            started = time.perf_counter()
            result = function(*args)
            return result, started, time.perf_counter()

        return await asyncio.get_running_loop().run_in_executor(self.executor, timed)


@dataclass
class _Waiting:
    key: Hashable
    payload: Any
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Predicts concurrent requests together.

    ``predict_many(key, payloads) -> results`` runs on the admission's threads with requests that share ``key``
    (their inference options), at most ``max_batch`` of them; :meth:`submit` returns the request's result with
    the batch's start and end times, as :meth:`Admission.run` does. An exception it raises goes to each request
    of the batch. The worker tasks start with the first request, in the loop that serves it (no startup hook, so
    the app runs the same under uvicorn, a test client and Ray Serve).
    """

    def __init__(self, predict_many: Callable[[Hashable, Sequence[Any]], List[Any]], admission: Admission,
                 max_batch: int, wait_s: float, workers: int) -> None:
        self.predict_many = predict_many
        self.admission = admission
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.workers = workers
        self.batch_sizes: Dict[int, int] = {}  # batches run, by size (the metrics report them)
        self._queue: Optional[asyncio.Queue] = None
        self._tasks: List[asyncio.Task] = []

    async def submit(self, key: Hashable, payload: Any) -> Tuple[Any, float, float]:
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._tasks = [loop.create_task(self._work()) for _ in range(self.workers)]
        waiting = _Waiting(key, payload, loop.create_future())
        await self._queue.put(waiting)
        return await waiting.future

    async def _gather(self) -> Tuple[Hashable, List[_Waiting]]:
        """The next batch: the oldest request and those with its key that arrive within ``wait_s``."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = await self._queue.get()
        batch, others = [first], []
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                waiting = self._queue.get_nowait() if self._queue.qsize() else await asyncio.wait_for(
                    self._queue.get(), max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            (batch if waiting.key == first.key else others).append(waiting)
        for waiting in others:  # other options wait for a batch of their own, in their order
            self._queue.put_nowait(waiting)
        return first.key, batch

    async def _work(self) -> None:
        while True:
            key, batch = await self._gather()
            batch = [waiting for waiting in batch if not waiting.future.done()]  # cancelled: client gone
            if not batch:
                continue
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
            try:
                results, started, ended = await self.admission.run(self.predict_many, key,
                                                                   [w.payload for w in batch])
            except Exception as error:  # noqa: BLE001 - handed to the requests, which answer for it
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                continue
            for waiting, result in zip(batch, results):
                if not waiting.future.done():
                    waiting.future.set_result((result, started, ended))
