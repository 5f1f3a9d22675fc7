"""A pool of decode threads shared by every embedded-engine session.

CTranslate2 and pocketsphinx release the GIL while they compute, so threads
give real parallelism; one worker per core keeps each decode on its own core.
Two ways in:

* :meth:`DecodePool.run` waits for a worker (finals: they must happen);
* :meth:`DecodePool.try_run` runs only if a worker is free right now, else
  returns ``None`` (partials: skip a round rather than queue behind real time).

``saturated`` tells admission control that decodes are waiting for a worker
for longer than real time allows: the recent average wait is over
:data:`MAX_QUEUE_DELAY_S`, or something has waited :data:`STUCK_QUEUE_DELAY_S`.
A new session would then only make every session fall behind.  A short burst
(sessions starting or finishing utterances at the same moment) does not count.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Final, TypeVar

T = TypeVar("T")

MAX_QUEUE_DELAY_S: Final = 1.0
"""Average wait for a worker (recent decodes) above which the pool is saturated."""
STUCK_QUEUE_DELAY_S: Final = 3.0
"""Wait of a single decode still in line above which the pool is saturated."""
_SMOOTHING: Final = 0.2


class DecodePool:
    """Bounded thread pool with a non-blocking fast path.

    Args:
        workers: number of threads; 0 means one per CPU core.
    """

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        self._slots = asyncio.Semaphore(self.workers)
        self.busy = 0
        """Workers running a decode now."""
        self._waiting_since: dict[int, float] = {}
        self._tickets = 0
        self.average_wait = 0.0
        """Exponential moving average of the time decodes waited for a worker."""
        self.busy_seconds = 0.0
        """Total time workers spent decoding (for benchmarks and metrics)."""
        self.finished_at = time.monotonic()
        """When a decode last ended: a pool that finishes decodes is alive, if busy."""

    @property
    def waiting(self) -> int:
        """Decodes waiting for a worker."""
        return len(self._waiting_since)

    @property
    def saturated(self) -> bool:
        """True when decodes wait for a worker longer than real time allows."""
        if not self._waiting_since and self.busy < self.workers:
            return False  # a free worker now: whatever the past average says
        if self.average_wait > MAX_QUEUE_DELAY_S:
            return True
        if not self._waiting_since:
            return False
        oldest = min(self._waiting_since.values())
        return time.monotonic() - oldest > STUCK_QUEUE_DELAY_S

    async def run(self, fn: Callable[[], T], executor: Executor | None = None) -> T:
        """Run ``fn`` on a worker, waiting for one if all are busy.

        ``executor``: where ``fn`` runs while it holds a worker's slot (default:
        this pool's threads); pocketsphinx runs in processes, see local_sphinx.
        """
        self._tickets += 1
        ticket = self._tickets
        since = self._waiting_since[ticket] = time.monotonic()
        try:
            await self._slots.acquire()
        finally:
            del self._waiting_since[ticket]
        waited = time.monotonic() - since
        self.average_wait += _SMOOTHING * (waited - self.average_wait)
        return await self._run_holding_slot(fn, executor)

    async def try_run(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` only if a worker is free now; ``None`` means skipped."""
        if self._slots.locked() or self.waiting:
            return None
        await self._slots.acquire()  # free: returns without waiting
        return await self._run_holding_slot(fn)

    async def _run_holding_slot(self, fn: Callable[[], T], executor: Executor | None = None) -> T:
        self.busy += 1
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        future = loop.run_in_executor(executor or self._executor, fn)
        try:
            # The thread cannot be interrupted: if our caller is cancelled, the
            # slot stays taken until the decode really ends.
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._release(started)
            else:
                future.add_done_callback(lambda _f: self._release(started))

    def _release(self, started: float) -> None:
        self.busy_seconds += time.perf_counter() - started
        self.finished_at = time.monotonic()
        self.busy -= 1
        self._slots.release()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
