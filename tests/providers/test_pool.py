"""The decode pool: finals wait for a worker, partials skip, saturation is visible."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from transcribe_gateway.providers import pool as pool_module
from transcribe_gateway.providers.pool import LATE_FINALS_S, MAX_QUEUE_DELAY_S, DecodePool


async def test_try_run_skips_when_every_worker_is_busy() -> None:
    pool = DecodePool(1)
    gate = threading.Event()
    busy = asyncio.create_task(pool.run(gate.wait))
    await asyncio.sleep(0.05)
    assert pool.busy == 1
    assert await pool.try_run(lambda: "partial") is None  # skipped, not queued
    gate.set()
    assert await busy is True
    assert await pool.try_run(lambda: "partial") == "partial"
    pool.shutdown()


async def test_run_waits_and_saturation_counts_waiters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "STUCK_QUEUE_DELAY_S", 0.2)
    pool = DecodePool(2)
    gate = threading.Event()
    running = [asyncio.create_task(pool.run(gate.wait)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert not pool.saturated
    waiting = [asyncio.create_task(pool.run(lambda: 1)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert pool.waiting == 2
    assert not pool.saturated  # a queue that just formed is not saturation...
    await asyncio.sleep(0.3)
    assert pool.saturated  # ...work stuck in line is (STUCK_QUEUE_DELAY_S is 0.2 here)
    # A waiter in line also stops partials from jumping the queue.
    assert await pool.try_run(lambda: 2) is None
    gate.set()
    assert await asyncio.gather(*running, *waiting) == [True, True, 1, 1]
    assert pool.busy == 0 and pool.waiting == 0 and not pool.saturated
    pool.shutdown()


async def test_cancelled_caller_keeps_the_slot_until_the_thread_ends() -> None:
    pool = DecodePool(1)
    gate = threading.Event()
    task = asyncio.create_task(pool.run(gate.wait))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    assert pool.busy == 1  # the thread is still decoding: its slot is not free
    gate.set()
    await asyncio.sleep(0.1)
    assert pool.busy == 0
    assert await pool.try_run(lambda: "free") == "free"
    pool.shutdown()


async def test_saturation_follows_the_average_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = DecodePool(1)
    assert not pool.saturated
    gate = threading.Event()
    first = asyncio.create_task(pool.run(gate.wait))
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(pool.run(lambda: None)) for _ in range(3)]
    await asyncio.sleep(0.05)
    monkeypatch.setattr(pool_module, "MAX_QUEUE_DELAY_S", 0.02)
    pool.average_wait = 0.05  # as after a congested minute
    assert pool.saturated  # recent decodes waited too long and all workers are busy
    gate.set()
    await asyncio.gather(first, *queued)
    assert pool.average_wait > 0.02
    assert not pool.saturated  # nothing waits: admits again, whatever the past average
    assert MAX_QUEUE_DELAY_S == 1.0  # the production threshold is unchanged
    pool.shutdown()


async def test_saturation_follows_the_lateness_of_recent_finals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "LATENESS_WINDOW_S", 0.2)
    monkeypatch.setattr(pool_module, "IDLE_FORGETS_S", 60.0)  # the window alone here
    pool = DecodePool(1)
    pool.final_delivered(2.5)
    assert pool.final_lateness == 2.5
    assert not pool.saturated  # one slow final is not a pool behind (LATE_FINALS_MIN)
    await asyncio.sleep(0.25)
    for late in (0.2, 0.4, 0.3):
        pool.final_delivered(late)
    assert pool.final_lateness == pytest.approx(0.3)  # the first has been forgotten
    assert not pool.saturated  # finals on time
    for late in (2.5, 2.0):
        pool.final_delivered(late)
    assert pool.final_lateness == pytest.approx(1.08)
    assert pool.busy == 0 and pool.saturated  # late finals: behind, with a worker free now
    await asyncio.sleep(0.25)
    assert pool.final_lateness == 0.0 and not pool.saturated  # forgotten: admits again
    assert LATE_FINALS_S == 1.0  # the production threshold
    pool.shutdown()


async def test_a_pool_that_has_caught_up_forgets_late_finals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A burst that is over (callers hung up, the last decode ended) does not keep
    # new sessions out for the rest of the lateness window.
    monkeypatch.setattr(pool_module, "IDLE_FORGETS_S", 0.2)
    pool = DecodePool(1)
    gate = threading.Event()
    decoding = asyncio.create_task(pool.run(gate.wait))
    await asyncio.sleep(0.3)
    for late in (2.0, 3.0, 2.5):
        pool.final_delivered(late)
    assert pool.saturated  # behind, and still decoding
    gate.set()
    await decoding
    assert pool.saturated  # the last decode just ended: not yet caught up
    await asyncio.sleep(0.3)
    assert pool.final_lateness == 0.0 and not pool.saturated  # idle 0.3 s: caught up
    pool.shutdown()


async def test_a_burst_that_is_over_leaves_no_saturation_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Decodes queued in a burst raise the average wait, which only run() moves.
    # After it, a worker busy with a partial (try_run: it never waits) with
    # nobody in line is not a saturated pool, and an idle pool forgets the burst.
    monkeypatch.setattr(pool_module, "MAX_QUEUE_DELAY_S", 0.05)
    monkeypatch.setattr(pool_module, "IDLE_FORGETS_S", 0.2)
    pool = DecodePool(1)
    gate = threading.Event()
    first = asyncio.create_task(pool.run(gate.wait))
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(pool.run(lambda: None)) for _ in range(3)]
    await asyncio.sleep(0.3)
    assert pool.waiting == 3
    gate.set()
    await asyncio.gather(first, *queued)
    assert pool.average_wait > 0.05
    partial_gate = threading.Event()
    partial = asyncio.create_task(pool.try_run(partial_gate.wait))
    try:
        await asyncio.sleep(0.05)
        assert pool.busy == pool.workers and pool.waiting == 0
        assert not pool.saturated  # every worker busy, nobody waiting: not behind
    finally:
        partial_gate.set()
    assert await partial is True
    await asyncio.sleep(0.3)
    assert not pool.saturated
    assert pool.average_wait == 0.0  # idle past IDLE_FORGETS_S: the burst is forgotten
    # A queue that forms later starts from no history: not saturated at once.
    gate.clear()
    first = asyncio.create_task(pool.run(gate.wait))
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(pool.run(lambda: None))]
    await asyncio.sleep(0.01)
    assert pool.waiting == 1 and not pool.saturated
    gate.set()
    await asyncio.gather(first, *queued)
    pool.shutdown()


def test_cgroup_cpu_quota_reads_v2_and_v1(tmp_path: Path) -> None:
    # v2: the process's cgroup and its parents, the tightest quota, rounded up.
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "a" / "cpu.max").write_text("150000 100000\n")
    assert pool_module.cgroup_cpu_quota(str(tmp_path), "0::/a/b\n") == 2
    (tmp_path / "a" / "cpu.max").write_text("max 100000\n")
    assert pool_module.cgroup_cpu_quota(str(tmp_path), "0::/a/b\n") is None
    # v1: the cpu controller's mount.
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert pool_module.cgroup_cpu_quota(str(tmp_path), "4:memory:/x\n3:cpu,cpuacct:/\n") == 3
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert pool_module.cgroup_cpu_quota(str(tmp_path), "3:cpu,cpuacct:/\n") is None
    assert pool_module.cgroup_cpu_quota(str(tmp_path / "absent"), "0::/\n") is None


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
def test_workers_0_is_one_per_cpu_the_process_may_use() -> None:
    # Pinned to one CPU (taskset), the process gets one worker, not one per
    # core of the machine.
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to pin to one")
    cpu = min(os.sched_getaffinity(0))
    code = "from transcribe_gateway.providers.pool import DecodePool; print(DecodePool(0).workers)"
    pinned = subprocess.run(
        ["taskset", "-c", str(cpu), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert pinned.stdout.strip() == "1"
    assert pool_module.usable_cpus() <= len(os.sched_getaffinity(0))


async def test_a_call_refused_at_once_gives_its_slot_back() -> None:
    # A broken process pool refuses a call as it is submitted, not through its
    # future: the slot must not stay taken (every slot gone, every decode waits).
    pool = DecodePool(1)
    refusing = ThreadPoolExecutor(1)
    refusing.shutdown()
    with pytest.raises(RuntimeError):
        await pool.run(lambda: 1, refusing)
    assert pool.busy == 0
    assert await pool.try_run(lambda: 7) == 7
    pool.shutdown()
