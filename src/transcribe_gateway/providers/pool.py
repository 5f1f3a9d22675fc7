"""A pool of decode threads shared by every embedded-engine session.

CTranslate2 and pocketsphinx release the GIL while they compute, so threads
give real parallelism; one worker per core keeps each decode on its own core.
Two ways in:

* :meth:`DecodePool.run` waits for a worker (finals: they must happen);
* :meth:`DecodePool.try_run` runs only if a worker is free right now, else
  returns ``None`` (partials: skip a round rather than queue behind real time).

``saturated`` tells admission control that the decoders are behind, so a new
session would only make every session fall behind further:

* the finals that real-time streams delivered over the last
  :data:`LATENESS_WINDOW_S` (at least :data:`LATE_FINALS_MIN` of them) came
  more than :data:`LATE_FINALS_S` after their endpoint on average (the
  streams report it: :meth:`DecodePool.final_delivered`).  This is what
  callers feel, and it sees a pool whose queue never shows: callers who talk
  without pause keep its worker busy with partials, which never wait, and with
  finals that wait in short turns (BENCHMARKS.md, *Admission under continuous
  talk*).  A pool idle for :data:`IDLE_FORGETS_S` has caught up, and forgets;
* or decodes wait for a worker now, and the recent average wait is over
  :data:`MAX_QUEUE_DELAY_S` or one has waited :data:`STUCK_QUEUE_DELAY_S` (a
  client sending a file faster than real time is paced by this queue, and its
  finals' lateness says nothing about the pool).  With nothing waiting, the
  average is history: only :meth:`DecodePool.run` moves it, so after a burst
  it stayed high while partials (which never wait) kept every worker busy,
  and sessions were refused with nobody in line; the idle pool forgets it
  with the lateness.

A short burst (sessions starting or finishing utterances at the same moment)
does not count.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Final, TypeVar

T = TypeVar("T")

MAX_QUEUE_DELAY_S: Final = 1.0
"""Average wait for a worker (recent decodes) above which the pool is saturated."""
STUCK_QUEUE_DELAY_S: Final = 3.0
"""Wait of a single decode still in line above which the pool is saturated."""
LATE_FINALS_S: Final = 1.0
"""Mean lateness of real-time streams' recent finals above which the pool is saturated."""
LATENESS_WINDOW_S: Final = 10.0
"""How recent a final must be to count in that mean."""
LATE_FINALS_MIN: Final = 3
"""Recent finals needed for that mean to count: one slow final (a long utterance
whose two readings disagreed, decoded again) is not a pool that is behind."""
IDLE_FORGETS_S: Final = 1.0
"""A pool that has had no decode under way for this long has caught up: how late
earlier finals were, and how long decodes waited, is forgotten (else a burst that
is over, twenty callers hanging up at once, would keep new sessions out for the
rest of the window)."""
_SMOOTHING: Final = 0.2


def usable_cpus() -> int:
    """CPUs this process may run on: its CPU affinity (``taskset``, cpusets), capped
    by a cgroup CPU quota (a container's ``--cpus``), rounded up.

    Not ``os.cpu_count()``, the machine's: one worker per core of the machine on a
    process pinned to fewer would make decodes share cores, each slower than one
    alone, and admission would count workers the process does not have.
    """
    process_cpu_count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if process_cpu_count is not None:
        count = process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:
        count = os.cpu_count()
    count = count or 1
    quota = cgroup_cpu_quota()
    return max(1, min(count, quota) if quota is not None else count)


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", membership: str | None = None) -> int | None:
    """The CPU quota of this process's cgroup (or of one above it), in whole CPUs
    rounded up; ``None`` when there is none, or it cannot be read.

    cgroup v2: ``cpu.max`` (``"200000 100000"`` is two CPUs; ``"max ..."``, none)
    in the process's cgroup and each parent up to ``root``; cgroup v1:
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none) at the ``cpu``
    controller's mount.  ``membership``: ``/proc/self/cgroup``'s text (for tests).
    """
    try:
        if membership is None:
            with open("/proc/self/cgroup") as file:
                membership = file.read()
    except OSError:
        return None
    limits: list[float] = []
    for line in membership.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        controllers, path = fields[1], fields[2]
        if controllers == "":  # v2: one hierarchy
            mounts, quota_name, period_name = [root], "cpu.max", None
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's hierarchy
            mounts = [os.path.join(root, name) for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            quota_name, period_name = "cpu.cfs_quota_us", "cpu.cfs_period_us"
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for mount in mounts:
            # The process's cgroup and its parents (a parent's quota binds too); in
            # a container with its own cgroup namespace the mount's root is its own.
            for depth in range(len(parts), -1, -1):
                limit = _read_quota(os.path.join(mount, *parts[:depth]), quota_name, period_name)
                if limit is not None:
                    limits.append(limit)
    return max(1, math.ceil(min(limits))) if limits else None


def _read_quota(directory: str, quota_name: str, period_name: str | None) -> float | None:
    """CPUs one cgroup directory's quota allows (``None``: no quota, or no file)."""
    try:
        with open(os.path.join(directory, quota_name)) as file:
            fields = file.read().split()
        if period_name is not None:
            with open(os.path.join(directory, period_name)) as file:
                fields.append(file.read().strip())
        quota, period = fields[0], fields[1]
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, IndexError):
        return None


class DecodePool:
    """Bounded thread pool with a non-blocking fast path.

    Args:
        workers: number of threads; 0 means one per CPU this process may use
            (:func:`usable_cpus`).
    """

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or usable_cpus()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        self._slots = asyncio.Semaphore(self.workers)
        self.busy = 0
        """Workers running a decode now."""
        self._waiting_since: dict[int, float] = {}
        self._tickets = 0
        self._average_wait = 0.0
        self.busy_seconds = 0.0
        """Total time workers spent decoding (for benchmarks and metrics)."""
        self.finished_at = time.monotonic()
        """When a decode last ended: a pool that finishes decodes is alive, if busy."""
        self._lateness: deque[tuple[float, float]] = deque(maxlen=10_000)
        """(when, seconds late) of the recent finals of real-time streams."""

    @property
    def waiting(self) -> int:
        """Decodes waiting for a worker."""
        return len(self._waiting_since)

    def final_delivered(self, late_s: float) -> None:
        """A real-time stream delivered a final ``late_s`` after its endpoint."""
        self._lateness.append((time.monotonic(), late_s))

    @property
    def average_wait(self) -> float:
        """Exponential moving average of the time decodes waited for a worker (0 once
        the pool has been idle ``IDLE_FORGETS_S``)."""
        self._forget_if_idle(time.monotonic())
        return self._average_wait

    @average_wait.setter
    def average_wait(self, seconds: float) -> None:
        self._average_wait = seconds

    def _forget_if_idle(self, now: float) -> None:
        """A pool idle for ``IDLE_FORGETS_S`` has caught up: its past is forgotten."""
        if self.busy == 0 and not self._waiting_since and now - self.finished_at > IDLE_FORGETS_S:
            self._lateness.clear()
            self._average_wait = 0.0

    def _recent_lateness(self) -> list[float]:
        """How late the finals of the last ``LATENESS_WINDOW_S`` came (none once the
        pool has been idle ``IDLE_FORGETS_S``)."""
        now = time.monotonic()
        self._forget_if_idle(now)
        while self._lateness and self._lateness[0][0] < now - LATENESS_WINDOW_S:
            self._lateness.popleft()
        return [late for _, late in self._lateness]

    @property
    def final_lateness(self) -> float:
        """Mean lateness of the recent finals (0 when there were none)."""
        recent = self._recent_lateness()
        return statistics.fmean(recent) if recent else 0.0

    @property
    def saturated(self) -> bool:
        """True when the decoders are behind real time (see the module's docstring)."""
        recent = self._recent_lateness()
        if len(recent) >= LATE_FINALS_MIN and statistics.fmean(recent) > LATE_FINALS_S:
            return True  # checked first: such a pool can have a worker free now
        if not self._waiting_since:
            # Nothing in line (a free worker, or every one busy with decodes that
            # did not wait, such as partials): whatever the past average says.
            return False
        if self.average_wait > MAX_QUEUE_DELAY_S:
            return True
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
        self._average_wait += _SMOOTHING * (waited - self._average_wait)
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
        try:
            future = loop.run_in_executor(executor or self._executor, fn)
        except BaseException:  # refused at once (a broken process pool): nothing runs
            self._release(started)
            raise
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
