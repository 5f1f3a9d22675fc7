"""A pool of decode threads shared by every embedded-engine session.

CTranslate2 and pocketsphinx release the GIL while they compute, so threads
give real parallelism; one worker per core keeps each decode on its own core.
Two ways in:

* :meth:`DecodePool.run` waits for a worker (finals: they must happen);
* :meth:`DecodePool.try_run` runs only if a worker is free right now, else
  returns ``None`` (partials: skip a round rather than queue behind real time).

``saturated`` tells admission control that finals are already queueing, so a
new session would only make every session fall behind.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


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
        self.waiting = 0
        """Decodes waiting for a worker."""
        self.busy_seconds = 0.0
        """Total time workers spent decoding (for benchmarks and metrics)."""

    @property
    def saturated(self) -> bool:
        """True when more decodes wait than there are workers."""
        return self.waiting >= self.workers

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a worker, waiting for one if all are busy."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        return await self._run_holding_slot(fn)

    async def try_run(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` only if a worker is free now; ``None`` means skipped."""
        if self._slots.locked() or self.waiting:
            return None
        await self._slots.acquire()  # free: returns without waiting
        return await self._run_holding_slot(fn)

    async def _run_holding_slot(self, fn: Callable[[], T]) -> T:
        self.busy += 1
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        future = loop.run_in_executor(self._executor, fn)
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
        self.busy -= 1
        self._slots.release()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
